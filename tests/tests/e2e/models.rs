//! Models against PyTorch `transformers`: SmolLM2 (real weights, GGUF Q4_1) and tiny random-weight
//! Llama-3 / Qwen2 / GPT-NeoX checkpoints; save/reload round trips; batched generation.

use r2m_models::{
    generate, load_hf_dir, save_hf_dir, ChatMessage, GenerationConfig, KvCache, Padding,
};

use crate::common::*;

/// Max |logit diff| allowed against PyTorch (f32).
const TOL: f32 = 1e-3;

#[test]
fn smollm2_tokenizer_and_chat_template_match_transformers() {
    let fx = read_json("smollm2_parity.json");
    let tok = smollm2().tokenizer().unwrap();
    for case in fx["tokenizer_cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, false).unwrap(),
            ids_of(&case["ids"]),
            "ids of {text:?}"
        );
    }
    for case in fx["cases"].as_array().unwrap() {
        if let Some(msgs) = case.get("messages").filter(|m| !m.is_null()) {
            let msgs: Vec<ChatMessage> = serde_json::from_value(msgs.clone()).unwrap();
            let text = tok.apply_chat_template(&msgs, true).unwrap();
            assert_eq!(
                text,
                case["text"].as_str().unwrap(),
                "chat template for {}",
                case["name"]
            );
        }
        let ids = tok.encode(case["text"].as_str().unwrap(), false).unwrap();
        assert_eq!(
            ids,
            ids_of(&case["input_ids"]),
            "ids of case {}",
            case["name"]
        );
    }
    assert_eq!(tok.eos_token.as_deref(), fx["eos_token"].as_str());
}

#[test]
fn smollm2_logits_and_greedy_continuation_match_pytorch() {
    let fx = read_json("smollm2_parity.json");
    let loaded = smollm2();
    for case in fx["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let ids = ids_of(&case["input_ids"]);
        let out = loaded.model.forward(
            int_tensor(std::slice::from_ref(&ids)),
            &Padding::none(1, ids.len()),
        );
        let vocab = loaded.model.config.vocab_size;
        let logits = to_vec(out.logits);
        let last = &logits[(ids.len() - 1) * vocab..];
        let mut max_diff = 0f32;
        for (id, want) in ids_of(&case["top_ids"])
            .iter()
            .zip(floats_of(&case["top_logits"]))
        {
            max_diff = max_diff.max((last[*id as usize] - want).abs());
        }
        eprintln!("{name}: max |logit diff| over top-50 = {max_diff:e}");
        assert!(
            max_diff <= TOL,
            "{name}: max |logit diff| {max_diff} > {TOL}"
        );

        let cfg = GenerationConfig {
            max_new_tokens: 32,
            eos_token_ids: vec![u32::MAX], // like the fixture: do not stop at EOS
            ..Default::default()
        };
        let g = generate(&loaded.model, loaded.tokenizer.as_ref(), &[ids], &cfg).unwrap();
        assert_eq!(
            g[0].tokens,
            ids_of(&case["greedy_ids"]),
            "{name}: greedy continuation"
        );
    }
}

#[test]
fn smollm2_batched_generation_equals_one_at_a_time() {
    let loaded = smollm2();
    let tok = loaded.tokenizer().unwrap();
    let texts = [
        "The quick brown fox",
        "In 1492, Columbus sailed across the Atlantic Ocean and",
        "Hi",
    ];
    let prompts: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| tok.encode(t, false).unwrap())
        .collect();
    let cfg = GenerationConfig {
        max_new_tokens: 12,
        ..Default::default()
    };
    let batched = generate(&loaded.model, Some(tok), &prompts, &cfg).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let single = generate(&loaded.model, Some(tok), std::slice::from_ref(p), &cfg).unwrap();
        assert_eq!(
            batched[i].tokens, single[0].tokens,
            "prompt {i} ({:?})",
            texts[i]
        );
        assert_eq!(batched[i].text, single[0].text);
        for (a, b) in batched[i].logprobs.iter().zip(&single[0].logprobs) {
            assert!((a - b).abs() < 1e-3, "logprob {a} vs {b}");
        }
    }
    assert!(batched
        .iter()
        .all(|g| !g.text.as_deref().unwrap().is_empty()));
}

#[test]
fn smollm2_sampling_is_seeded_and_stops_on_stop_strings() {
    let loaded = smollm2();
    let tok = loaded.tokenizer().unwrap();
    let text = tok
        .apply_chat_template(&[ChatMessage::user("Write a list of three fruits.")], true)
        .unwrap();
    let prompt = tok.encode(&text, false).unwrap();
    let cfg = GenerationConfig {
        max_new_tokens: 16,
        temperature: 0.7,
        top_p: Some(0.9),
        seed: 11,
        ..Default::default()
    };
    let a = generate(
        &loaded.model,
        Some(tok),
        std::slice::from_ref(&prompt),
        &cfg,
    )
    .unwrap();
    let b = generate(
        &loaded.model,
        Some(tok),
        std::slice::from_ref(&prompt),
        &cfg,
    )
    .unwrap();
    assert_eq!(a[0].tokens, b[0].tokens);
    assert!(a[0].logprobs.iter().all(|lp| lp.is_finite() && *lp <= 0.0));

    // Stop at the first space of the greedy completion: the text is cut before it.
    let greedy = GenerationConfig {
        max_new_tokens: 16,
        ..Default::default()
    };
    let full = generate(
        &loaded.model,
        Some(tok),
        std::slice::from_ref(&prompt),
        &greedy,
    )
    .unwrap();
    let full_text = full[0].text.clone().unwrap();
    let word_end = full_text.trim_start().find(' ').expect("a space")
        + (full_text.len() - full_text.trim_start().len());
    let stop = GenerationConfig {
        stop_strings: vec![" ".into()],
        ..greedy
    };
    let cut = generate(
        &loaded.model,
        Some(tok),
        std::slice::from_ref(&prompt),
        &stop,
    )
    .unwrap();
    assert_eq!(cut[0].text.as_deref().unwrap(), &full_text[..word_end]);
    assert!(cut[0].tokens.len() < full[0].tokens.len());
}

#[test]
fn smollm2_save_reload_gives_identical_logits() {
    let loaded = smollm2();
    let dir = tempfile::tempdir().unwrap();
    save_hf_dir(&loaded.model, loaded.tokenizer.as_ref(), dir.path()).unwrap();
    let again = load_hf_dir::<TB>(dir.path(), &device()).unwrap();
    let ids = vec![vec![504u32, 3575, 282, 4649, 314]];
    let a = to_vec(
        loaded
            .model
            .forward(int_tensor(&ids), &Padding::none(1, 5))
            .logits,
    );
    let b = to_vec(
        again
            .model
            .forward(int_tensor(&ids), &Padding::none(1, 5))
            .logits,
    );
    assert_eq!(a, b);
    let tok = again.tokenizer().unwrap();
    assert_eq!(
        tok.encode("The capital of France is", false).unwrap(),
        ids[0]
    );
    assert_eq!(
        tok.chat_template,
        loaded.tokenizer.as_ref().unwrap().chat_template
    );
}

fn check_tiny(name: &str) {
    let fx = read_json(&format!("tiny/{name}.json"));
    let dir = fixture_dir().join("tiny").join(name);
    let loaded = load_hf_dir::<TB>(&dir, &device()).unwrap();
    let rows: Vec<Vec<u32>> = fx["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids_of)
        .collect();
    let (b, s) = (rows.len(), rows[0].len());
    let out = loaded
        .model
        .forward(int_tensor(&rows), &Padding::none(b, s));
    let got = to_vec(out.logits.clone());
    let want: Vec<f32> = fx["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().flat_map(floats_of))
        .collect();
    assert_eq!(got.len(), want.len());
    let max_diff = max_abs_diff(&got, &want);
    eprintln!("{name}: max |logit diff| = {max_diff:e}");
    assert!(max_diff <= TOL, "{name}: max |logit diff| {max_diff}");

    let hidden = to_vec(out.hidden.narrow(0, 0, 1));
    let want_h: Vec<f32> = fx["hidden"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(floats_of)
        .collect();
    let max_h = max_abs_diff(&hidden, &want_h);
    assert!(max_h <= TOL, "{name}: max |hidden diff| {max_h}");

    // Round trip through our own HF export.
    let tmp = tempfile::tempdir().unwrap();
    save_hf_dir(&loaded.model, None, tmp.path()).unwrap();
    let again = load_hf_dir::<TB>(tmp.path(), &device()).unwrap();
    assert_eq!(again.model.config, loaded.model.config);
    let got2 = to_vec(
        again
            .model
            .forward(int_tensor(&rows), &Padding::none(b, s))
            .logits,
    );
    assert_eq!(got, got2, "{name}: logits after save/reload");
}

#[test]
fn tiny_llama3_rope_scaling_untied_sharded_matches_pytorch() {
    check_tiny("tiny-llama3");
}

#[test]
fn tiny_qwen2_bf16_matches_pytorch() {
    check_tiny("tiny-qwen2");
}

#[test]
fn tiny_neox_parallel_residual_f16_matches_pytorch() {
    check_tiny("tiny-neox");
}

#[test]
fn tiny_neox_sequential_residual_matches_pytorch() {
    check_tiny("tiny-neox-seq");
}

#[test]
fn left_padding_does_not_change_a_rows_logits() {
    let dir = fixture_dir().join("tiny").join("tiny-llama3");
    let m = load_hf_dir::<TB>(&dir, &device()).unwrap().model;
    let ids = vec![5u32, 17, 99, 3, 42];
    let alone = to_vec(
        m.forward(int_tensor(std::slice::from_ref(&ids)), &Padding::none(1, 5))
            .logits,
    );
    let mut padded = vec![0u32, 0, 0];
    padded.extend(&ids);
    let other = vec![7u32, 8, 9, 10, 11, 12, 13, 14];
    let pad = Padding::from_mask(&[vec![0, 0, 0, 1, 1, 1, 1, 1], vec![1; 8]]);
    let out = to_vec(m.forward(int_tensor(&[padded, other]), &pad).logits);
    let vocab = m.config.vocab_size;
    let row0 = &out[3 * vocab..8 * vocab];
    let max_diff = max_abs_diff(row0, &alone);
    assert!(max_diff < 1e-4, "{max_diff}");
    assert!(
        out.iter().all(|x| x.is_finite()),
        "padding rows must not produce NaN"
    );
}

/// Decoding token by token through the KV cache gives the full forward pass's logits, whether
/// the cache grows by concatenation, has room to spare and doubles (4 -> 8 -> 16 positions), or
/// runs past its capacity (tiny Llama-3 with grouped-query heads, one left-padded row).
#[test]
fn kv_cache_decoding_matches_the_full_forward_pass() {
    let dir = fixture_dir().join("tiny").join("tiny-llama3");
    let m = load_hf_dir::<TB>(&dir, &device()).unwrap().model;
    assert!(m.config.num_heads > m.config.num_kv_heads, "want GQA");
    let rows = vec![
        vec![0u32, 0, 5, 17, 99, 3, 42, 8, 61, 30],
        vec![7u32, 8, 9, 10, 11, 12, 13, 14, 15, 16],
    ];
    let (b, len, prefill) = (rows.len(), rows[0].len(), 4);
    let mask: Vec<Vec<u8>> = rows
        .iter()
        .map(|r| {
            let n_pad = if r[0] == 0 { 2 } else { 0 };
            (0..len).map(|i| u8::from(i >= n_pad)).collect()
        })
        .collect();
    let full_pad = Padding::from_mask(&mask);
    let full = to_vec(m.forward(int_tensor(&rows), &full_pad).logits);
    let vocab = m.config.vocab_size;
    let n_layers = m.config.num_layers;
    for (what, mut cache) in [
        ("growing", KvCache::new(n_layers)),
        ("overflowing", KvCache::with_capacity(n_layers, 6)),
        ("doubling", KvCache::with_capacity(n_layers, 16)),
    ] {
        let mut pad = Padding::from_mask(
            &mask
                .iter()
                .map(|r| r[..prefill].to_vec())
                .collect::<Vec<_>>(),
        );
        let ids: Vec<Vec<u32>> = rows.iter().map(|r| r[..prefill].to_vec()).collect();
        let mut got = to_vec(m.lm_head(m.forward_hidden(int_tensor(&ids), &pad, Some(&mut cache))));
        for pos in prefill..len {
            pad.push_valid(1);
            let ids: Vec<Vec<u32>> = rows.iter().map(|r| vec![r[pos]]).collect();
            let step =
                to_vec(m.lm_head(m.forward_hidden(int_tensor(&ids), &pad, Some(&mut cache))));
            // Interleave: row r's logits for positions 0..=pos.
            let mut merged = Vec::with_capacity(b * (pos + 1) * vocab);
            for r in 0..b {
                merged.extend_from_slice(&got[r * pos * vocab..(r + 1) * pos * vocab]);
                merged.extend_from_slice(&step[r * vocab..(r + 1) * vocab]);
            }
            got = merged;
        }
        assert_eq!(cache.len(), len, "{what}");
        // Padding positions' logits are meaningless; compare real positions only.
        for (r, row_mask) in mask.iter().enumerate() {
            for (pos, &real) in row_mask.iter().enumerate() {
                if real == 0 {
                    continue;
                }
                let at = (r * len + pos) * vocab;
                let d = max_abs_diff(&got[at..at + vocab], &full[at..at + vocab]);
                assert!(d < 1e-4, "{what}: row {r} position {pos} differs by {d}");
            }
        }
    }
}
