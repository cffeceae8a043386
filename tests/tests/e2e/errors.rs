//! Bad input gets an error naming the file and what is wrong, never a panic.

use std::path::Path;

use r2m_core::R2mError;
use r2m_models::{load_gguf, load_hf_dir, Tokenizer};

use crate::common::*;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn tiny_copy(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture_dir().join("tiny").join(name), tmp.path());
    tmp
}

fn smollm2_path() -> std::path::PathBuf {
    r2m_models::hub::fetch_smollm2(&mut |_| {}).unwrap()
}

#[test]
fn truncated_gguf_is_reported_with_its_path() {
    let bytes = std::fs::read(smollm2_path()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for cut in [10usize, 4_000, bytes.len() / 2] {
        let p = tmp.path().join(format!("cut{cut}.gguf"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let err = load_gguf::<TB>(&p, &device()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&p.display().to_string()) && msg.contains("truncated"),
            "{msg}"
        );
    }
}

#[test]
fn gguf_with_bad_magic_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("bad.gguf");
    std::fs::write(&p, b"NOPE0000000000000000000000").unwrap();
    let msg = load_gguf::<TB>(&p, &device()).unwrap_err().to_string();
    assert!(
        msg.contains("not a GGUF file") && msg.contains("bad.gguf"),
        "{msg}"
    );
}

#[test]
fn truncated_safetensors_is_reported() {
    let tmp = tiny_copy("tiny-qwen2");
    let p = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let msg = load_hf_dir::<TB>(tmp.path(), &device())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("model.safetensors") && msg.contains("not a valid safetensors"),
        "{msg}"
    );
}

#[test]
fn unknown_architecture_names_it() {
    let tmp = tiny_copy("tiny-qwen2");
    let p = tmp.path().join("config.json");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("\"qwen2\"", "\"bert\"");
    std::fs::write(&p, text).unwrap();
    let err = load_hf_dir::<TB>(tmp.path(), &device()).unwrap_err();
    assert!(
        matches!(err, R2mError::UnknownArchitecture { ref arch, .. } if arch == "bert"),
        "{err}"
    );
    assert!(err.to_string().contains("config.json"));
}

#[test]
fn shape_mismatch_names_the_tensor_and_shapes() {
    let tmp = tiny_copy("tiny-qwen2");
    let p = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let inter = cfg["intermediate_size"].as_u64().unwrap();
    cfg["intermediate_size"] = (inter * 2).into();
    std::fs::write(&p, cfg.to_string()).unwrap();
    let err = load_hf_dir::<TB>(tmp.path(), &device()).unwrap_err();
    match &err {
        R2mError::ShapeMismatch {
            name,
            expected,
            got,
            ..
        } => {
            assert!(name.contains("mlp"), "{name}");
            assert_ne!(expected, got);
        }
        other => panic!("expected a shape mismatch, got {other}"),
    }
}

#[test]
fn missing_tensor_and_bad_json_are_reported() {
    let tmp = tiny_copy("tiny-qwen2");
    let p = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["num_hidden_layers"] = (cfg["num_hidden_layers"].as_u64().unwrap() + 1).into();
    std::fs::write(&p, cfg.to_string()).unwrap();
    let err = load_hf_dir::<TB>(tmp.path(), &device()).unwrap_err();
    assert!(matches!(err, R2mError::MissingTensor { .. }), "{err}");

    std::fs::write(&p, "{\n  \"model_type\": \"qwen2\",\n  oops\n}").unwrap();
    let msg = load_hf_dir::<TB>(tmp.path(), &device())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("config.json") && msg.contains("line 3"),
        "{msg}"
    );
}

#[test]
fn missing_tokenizer_is_a_clear_error() {
    let dir = fixture_dir().join("tiny").join("tiny-qwen2");
    let loaded = load_hf_dir::<TB>(&dir, &device()).unwrap();
    assert!(loaded.tokenizer.is_none());
    assert!(loaded
        .tokenizer()
        .unwrap_err()
        .to_string()
        .contains("tokenizer"));
    let msg = Tokenizer::from_hf_dir(&dir).unwrap_err().to_string();
    assert!(msg.contains("tokenizer.json not found"), "{msg}");
}

#[test]
fn missing_weights_file_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture_dir().join("tiny/tiny-qwen2/config.json"),
        tmp.path().join("config.json"),
    )
    .unwrap();
    let msg = load_hf_dir::<TB>(tmp.path(), &device())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("no model.safetensors"), "{msg}");
}

#[test]
fn a_policy_tokenizer_other_than_the_rms_is_refused_with_what_differs() {
    use r2m_rl::reward::check_same_tokenizer;
    let smol = smollm2().tokenizer().unwrap();
    check_same_tokenizer(smol, smol).unwrap();
    // A word-level tokenizer of three words: another vocabulary.
    let dir = tempfile::tempdir().unwrap();
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "Human": 1, "Paris": 2}, "unk_token": "[UNK]"}
    });
    std::fs::write(dir.path().join("tokenizer.json"), json.to_string()).unwrap();
    let other = r2m_models::Tokenizer::from_hf_dir(dir.path()).unwrap();
    let e = check_same_tokenizer(smol, &other).unwrap_err().to_string();
    assert!(e.contains("differs") && e.contains("3 tokens"), "{e}");
}
