//! Real preference data: `shared/data/hh-rlhf/harmless-base-test.jsonl.gz` (read from the shared
//! folder beside the repository; not copied into it).

use std::path::PathBuf;

use r2m_data::{read_preferences, train_eval_split, ReadOptions};
use r2m_models::ChatMessage;

fn hh_path() -> PathBuf {
    let base = std::env::var_os("R2M_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
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
