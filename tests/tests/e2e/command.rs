//! The command reward (`[reward] kind = "command"`) against real reward commands: the POSIX `sh`
//! scripts in `tests/fixtures/reward_cmd`.

use std::path::Path;
use std::time::{Duration, Instant};

use r2m_core::observe::SILENT;
use r2m_models::generate::FinishReason;
use r2m_models::{ChatMessage, Generation};
use r2m_rl::command::CommandReward;
use r2m_rl::r2m_reward::reward_from_config;
use r2m_rl::{Experience, Prompt, RewardFn, RewardInput, RlConfig};

use crate::common::*;

/// The command that runs fixture script `name` (quoted, in case the checkout's path has spaces).
fn script(name: &str) -> String {
    let path = fixture_dir().join("reward_cmd").join(name);
    format!("sh '{}'", path.display())
}

/// A prompt whose conversation is one user message.
fn user_prompt(text: &str) -> Prompt {
    Prompt {
        ids: vec![],
        messages: Some(vec![ChatMessage::user(text)]),
    }
}

/// One input per (prompt, response text).
fn inputs<'a>(pairs: &'a [(Prompt, Option<&'a str>)]) -> Vec<RewardInput<'a>> {
    pairs
        .iter()
        .map(|(prompt, text)| RewardInput {
            prompt,
            response: &[],
            text: *text,
            finish: FinishReason::Eos,
        })
        .collect()
}

/// The request line the protocol specifies, built here independently of r2m.
fn request(prompt: &str, response: &str) -> String {
    let s = |x: &str| serde_json::Value::String(x.into()).to_string();
    format!("{{\"prompt\":{},\"response\":{}}}", s(prompt), s(response))
}

#[test]
fn scores_are_what_the_command_computes_from_each_request() {
    let mut reward = CommandReward::new(&script("length.sh"), Duration::from_secs(30)).unwrap();
    assert_eq!(
        RewardFn::name(&reward),
        format!("command {}", script("length.sh"))
    );
    let conversation = Prompt {
        ids: vec![1, 2, 3],
        messages: Some(vec![
            ChatMessage::new("system", "be brief"),
            ChatMessage::user("an earlier question"),
            ChatMessage::new("assistant", "an earlier answer"),
            ChatMessage::user("the last question"),
        ]),
    };
    let pairs = [
        (user_prompt("What is 2+2?"), Some("4")),
        // Quotes, backslashes, tabs and newlines are escaped: still one line per request.
        (
            user_prompt("say \"hi\"\\ \n\tthen stop"),
            Some("  hi\nthere\\n "),
        ),
        (conversation, Some("fine")),
        // No messages (token ids only) and no text: both are sent as "".
        (
            Prompt {
                ids: vec![5],
                messages: None,
            },
            None,
        ),
    ];
    let want: Vec<f32> = [
        request("What is 2+2?", "4"),
        request("say \"hi\"\\ \n\tthen stop", "  hi\nthere\\n "),
        request("the last question", "fine"),
        request("", ""),
    ]
    .iter()
    .map(|line| line.len() as f32)
    .collect();
    assert_eq!(reward.score(&inputs(&pairs)).unwrap(), want);
    // The same child serves the next batch, and an empty one.
    assert_eq!(reward.score(&inputs(&pairs[..1])).unwrap(), want[..1]);
    assert_eq!(reward.score(&[]).unwrap(), Vec::<f32>::new());
}

#[test]
fn a_batch_larger_than_the_pipes_does_not_deadlock() {
    // ~300 KB of requests, several times a pipe's buffer, written while the answers are read.
    let mut reward = CommandReward::new(&script("length.sh"), Duration::from_secs(30)).unwrap();
    let long = "x".repeat(600);
    let pairs: Vec<(Prompt, Option<&str>)> = (0..500)
        .map(|i| {
            (
                user_prompt(&"p".repeat(i % 7)),
                Some(&long[..300 + i % 300]),
            )
        })
        .collect();
    let scores = reward.score(&inputs(&pairs)).unwrap();
    for (i, s) in scores.iter().enumerate() {
        let line = request(&"p".repeat(i % 7), &long[..300 + i % 300]);
        assert_eq!(*s, line.len() as f32, "request {i}");
    }
}

#[test]
fn a_command_that_exits_stops_with_its_stderr_and_the_request() {
    let cmd = script("crash.sh");
    let mut reward = CommandReward::new(&cmd, Duration::from_secs(30)).unwrap();
    let pairs = [
        (user_prompt("a"), Some("b")),
        (user_prompt("c"), Some("d")),
        (user_prompt("e"), Some("f")),
    ];
    // The first request is answered; the script dies on the second, the first of this batch.
    assert_eq!(reward.score(&inputs(&pairs[..1])).unwrap(), vec![1.0]);
    let e = reward.score(&inputs(&pairs[1..])).unwrap_err().to_string();
    assert!(e.contains(&cmd), "{e}");
    assert!(
        e.contains("request 0 of the batch (request 1 overall)"),
        "{e}"
    );
    assert!(e.contains("exited (exit status: 3)"), "{e}");
    assert!(e.contains("crash.sh: cannot score this request"), "{e}");
    // The next batch starts a fresh child (which answers its first request again).
    assert_eq!(reward.score(&inputs(&pairs[..1])).unwrap(), vec![1.0]);
}

#[test]
fn an_answer_that_is_not_a_number_stops_with_what_was_written() {
    let cmd = script("garbage.sh");
    let mut reward = CommandReward::new(&cmd, Duration::from_secs(30)).unwrap();
    let pairs = [(user_prompt("a"), Some("b"))];
    let e = reward.score(&inputs(&pairs)).unwrap_err().to_string();
    assert!(e.contains(&cmd), "{e}");
    assert!(e.contains("request 0 of the batch"), "{e}");
    assert!(e.contains("\"not-a-number\""), "{e}");
    assert!(e.contains("garbage.sh: about to answer"), "{e}");
}

#[test]
fn a_command_that_hangs_times_out() {
    let cmd = script("hang.sh");
    let timeout = Duration::from_secs(1);
    let mut reward = CommandReward::new(&cmd, timeout).unwrap();
    let pairs = [(user_prompt("a"), Some("b")), (user_prompt("c"), Some("d"))];
    let start = Instant::now();
    let e = reward.score(&inputs(&pairs)).unwrap_err().to_string();
    let took = start.elapsed();
    assert!(took < timeout + Duration::from_secs(2), "took {took:?}");
    assert!(e.contains(&cmd), "{e}");
    assert!(
        e.contains("request 0 of the batch") && e.contains("within 1s"),
        "{e}"
    );
    assert!(e.contains("hang.sh: thinking"), "{e}");
    // Dropping the reward (the child is already killed) returns at once.
    let start = Instant::now();
    drop(reward);
    assert!(start.elapsed() < Duration::from_secs(1));
}

#[test]
fn the_config_builds_a_command_reward_that_scores_an_experience() {
    let toml = format!(
        "[reward]\nkind = \"command\"\ncommand = \"{}\"\ntimeout_s = 30\n",
        script("length.sh")
    );
    let cfg = RlConfig::from_toml_str(&toml, Path::new("run.toml")).unwrap();
    let mut reward = reward_from_config::<AB>(&cfg, 8, false, &device(), &SILENT).unwrap();
    assert_eq!(reward.name(), format!("command {}", script("length.sh")));
    let generation = |text: &str| Generation {
        tokens: vec![7, 2],
        logprobs: vec![0.0, 0.0],
        text: Some(text.into()),
        finish: FinishReason::Eos,
    };
    let exp = Experience::<TB>::new(
        vec![user_prompt("q")],
        2,
        vec![generation("yes"), generation("no")],
        0,
    );
    let scored = reward.score_experience(&exp, 1, 1).unwrap();
    assert_eq!(
        scored.scores,
        vec![
            request("q", "yes").len() as f32,
            request("q", "no").len() as f32
        ]
    );
}

#[test]
fn more_answers_than_requests_stop_the_next_batch() {
    let cmd = script("twice.sh");
    let mut reward = CommandReward::new(&cmd, Duration::from_secs(30)).unwrap();
    let pairs = [(user_prompt("a"), Some("b"))];
    assert_eq!(reward.score(&inputs(&pairs)).unwrap(), vec![1.0]);
    // Give the extra line time to arrive (it is written right after the answer).
    std::thread::sleep(Duration::from_millis(300));
    let e = reward.score(&inputs(&pairs)).unwrap_err().to_string();
    assert!(e.contains(&cmd), "{e}");
    assert!(
        e.contains("request 0 of the batch (request 1 overall)") && e.contains("\"2\""),
        "{e}"
    );
    assert!(e.contains("more answers than requests"), "{e}");
}

#[test]
fn a_command_that_cannot_run_stops_with_the_shell_s_error() {
    let cmd = "no-such-reward-command-r2m --flag";
    let mut reward = CommandReward::new(cmd, Duration::from_secs(30)).unwrap();
    let pairs = [(user_prompt("a"), Some("b"))];
    let e = reward.score(&inputs(&pairs)).unwrap_err().to_string();
    assert!(e.contains(cmd) && e.contains("exit status: 127"), "{e}");
    assert!(e.contains("not found"), "{e}");
}
