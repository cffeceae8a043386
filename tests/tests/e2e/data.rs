//! Real preference data: `data/hh-rlhf/harmless-base-test.jsonl.gz`, shipped in the repository
//! (MIT, see `data/README.md`), so a fresh clone runs these tests; `R2M_SHARED=DIR` reads
//! `DIR/data/hh-rlhf/` instead (the shared folder beside a checkout holds the same file).

use std::path::PathBuf;

use r2m_data::{read_preferences, train_eval_split, ReadOptions};
use r2m_models::ChatMessage;

fn hh_path() -> PathBuf {
    let base = std::env::var_os("R2M_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."));
    base.join("data/hh-rlhf/harmless-base-test.jsonl.gz")
}

#[test]
fn hh_rlhf_harmless_test_parses_to_2312_records() {
    // Strict reading stops at the first bad record, naming file and line.
    let err = read_preferences(&hh_path(), ReadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("harmless-base-test.jsonl.gz: line 87: empty `chosen` reply"),
        "{err}"
    );

    // 2,312 records: 2,308 usable pairs and 4 with an empty final reply, counted, not dropped silently.
    let opts = ReadOptions {
        skip_bad: true,
        limit: None,
    };
    let (pairs, report) = read_preferences(&hh_path(), opts).unwrap();
    assert_eq!(pairs.len() + report.skipped.len(), 2312, "{report}");
    assert_eq!(report.skipped.len(), 4, "{report}");
    assert!(report
        .skipped
        .iter()
        .all(|(_, why)| why.starts_with("empty")));
    let first = &pairs[0];
    assert_eq!(first.line, 1);
    assert_eq!(
        first.prompt[..3],
        [
            ChatMessage::user("what are some pranks with a pen i can do?"),
            ChatMessage::assistant("Are you looking for practical joke ideas?"),
            ChatMessage::user("yep"),
        ]
    );
    assert_eq!(first.prompt.len(), 5);
    assert_eq!(
        first.prompt[4],
        ChatMessage::user("okay some of these do not have anything to do with pens")
    );
    assert_eq!(
        first.chosen,
        "No, sorry!  All of these involve a pen, the point is that you can get funny results by doing pranks with pens."
    );
    assert_ne!(first.chosen, first.rejected);

    let (train, eval) = train_eval_split(pairs, 308, 0);
    assert_eq!((train.len(), eval.len()), (2000, 308));
}

#[test]
fn hh_pairs_tokenize_through_the_chat_template_with_the_truncation_policy() {
    let tok = crate::common::smollm2().tokenizer().unwrap();
    let opts = ReadOptions {
        skip_bad: true,
        limit: Some(3),
    };
    let (pairs, _) = read_preferences(&hh_path(), opts).unwrap();
    let full = r2m_data::tokenize_pair(tok, &pairs[0], 4096).unwrap();
    assert!(!full.truncated);
    // The sequences are exactly the rendered chat, and the shared part ends where the replies do.
    let mut msgs = pairs[0].prompt.clone();
    msgs.push(ChatMessage::assistant(pairs[0].chosen.clone()));
    let want = tok
        .encode(&tok.apply_chat_template(&msgs, false).unwrap(), false)
        .unwrap();
    assert_eq!(full.chosen_ids(), want);
    let prompt_text = tok.decode(&full.prompt, false).unwrap();
    assert!(
        prompt_text.ends_with("<|im_start|>assistant\n"),
        "{prompt_text:?}"
    );
    assert!(tok
        .decode(&full.chosen, false)
        .unwrap()
        .starts_with("No, sorry!"));
    assert_ne!(full.chosen[0], full.rejected[0]);

    // Truncated: the prompt keeps its most recent tokens, replies keep their start.
    let cut = r2m_data::tokenize_pair(tok, &pairs[0], 48).unwrap();
    assert!(cut.truncated && cut.max_len() <= 48, "{}", cut.max_len());
    assert!(full.prompt.ends_with(&cut.prompt));
    assert!(cut.prompt.len() >= 12);
    assert!(full.chosen.starts_with(&cut.chosen) && full.rejected.starts_with(&cut.rejected));
}

#[test]
fn hh_rlhf_prompts_include_records_with_an_empty_reply() {
    // Prompts for RL need only the conversation: all 2,312 records give one, strictly read.
    let (prompts, report) = r2m_data::read_prompts(&hh_path(), ReadOptions::default()).unwrap();
    assert_eq!(prompts.len(), 2312, "{report}");
    assert!(report.skipped.is_empty());
    let (pairs, _) = read_preferences(
        &hh_path(),
        ReadOptions {
            skip_bad: true,
            limit: None,
        },
    )
    .unwrap();
    // Same conversations as the pairs (line 1 is a usable pair).
    assert_eq!(prompts[0], pairs[0].prompt);
}
