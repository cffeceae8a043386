//! A reward computed outside r2m: [`CommandReward`] (`[reward] kind = "command"`).
//!
//! # Protocol
//!
//! r2m starts `sh -c COMMAND` once (so `COMMAND` may hold arguments, pipes, `cd dir && ...`) and
//! keeps it running for the whole run. For every response to score it writes one line to the
//! child's stdin, a JSON object in this exact compact form:
//!
//! ```text
//! {"prompt":"<last user message>","response":"<decoded response>"}
//! ```
//!
//! - `prompt` is the content of the prompt's last `user` message, as plain text; a prompt
//!   without messages (token ids only) or without a user message sends `""`;
//! - `response` is the decoded response (special tokens removed), or `""` when the policy has no
//!   tokenizer.
//!
//! JSON escapes newlines and other control characters, so each request is exactly one line.
//! The child answers each request, in order, with one line on stdout holding a JSON number
//! (e.g. `0.73`), and flushes it. Its stderr is free for logs: r2m keeps the last
//! [`STDERR_TAIL`] bytes and shows them when the child fails.
//!
//! # Errors
//!
//! The run stops (an [`R2mError`]) when the child exits (end of its stdout), gives no answer
//! within the timeout (counted per answer), or answers with something that is not a finite
//! JSON number, or writes more answers than it was sent requests (a line that arrives between
//! two batches). The message names the command, the request (its index in the batch and its
//! number since the reward was built, "overall"; both from 0), what the child wrote, and the
//! end of its stderr. After a failure the child is killed; the next batch starts a fresh one.
//!
//! # Threads
//!
//! Three threads serve the child, so that a full pipe never blocks r2m:
//!
//! - a writer owns the child's stdin and writes the request lines it is sent;
//! - a reader reads the child's stdout and sends each line back through a channel, which r2m
//!   reads with a timeout (`recv_timeout`);
//! - a drain reads the child's stderr into a ring buffer of its last bytes.
//!
//! A batch is sent to the writer whole, then the answers are read in order. The child can
//! therefore read ahead or answer in batches; no pipe stays full (the reader empties stdout,
//! the drain stderr), so neither side waits on the other forever, and a child that stops
//! reading stdin blocks only the writer thread, never the timeout.
//!
//! The child runs in its own process group: the terminal's Ctrl-C (which asks r2m to finish its
//! step and save) does not reach it, and dropping the reward kills the whole group (e.g. every
//! process of a pipeline), not only `sh`.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use r2m_core::{R2mError, Result};
use serde::Serialize;

use crate::experience::RewardInput;
use crate::reward::RewardFn;

/// How many bytes of the child's stderr are kept for error messages.
pub const STDERR_TAIL: usize = 2048;

/// At most this many characters of a bad answer are quoted in an error.
const QUOTED_ANSWER: usize = 200;

/// How long a failed child is given to close its stderr and be reaped, so that the error can
/// show its last words and its exit status.
const WAIT_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// A reward computed by an external command, one JSON line per response (see the module docs).
pub struct CommandReward {
    command: String,
    /// How long to wait for each answer.
    timeout: Duration,
    /// The running child; `None` after a failure (the next batch starts a new one).
    child: Option<Running>,
    /// Requests sent since the reward was built (the next request's number, from 0).
    sent: usize,
}

/// One request line, serialised as `{"prompt":...,"response":...}` (fields in this order).
#[derive(Serialize)]
struct Request<'a> {
    prompt: &'a str,
    response: &'a str,
}

/// What went wrong with one answer.
enum Failure {
    /// The child closed its stdout (it exited, most likely).
    Exited,
    /// No answer within the timeout.
    TimedOut,
    /// A line that is not a finite JSON number.
    NotANumber(String),
    /// Reading the child's stdout failed.
    Read(std::io::Error),
    /// A line that arrived before its request was sent (more answers than requests).
    Unasked(String),
}

impl CommandReward {
    /// Start `sh -c command`; `timeout` is how long each answer may take.
    pub fn new(command: &str, timeout: Duration) -> Result<Self> {
        if command.trim().is_empty() {
            return Err(R2mError::Config("reward.command is empty".into()));
        }
        Ok(Self {
            command: command.to_string(),
            timeout,
            child: Some(Running::start(command)?),
            sent: 0,
        })
    }

    /// The request line of one input (no trailing newline).
    pub fn request_line(x: &RewardInput<'_>) -> String {
        let prompt = x
            .prompt
            .messages
            .as_deref()
            .and_then(|m| m.iter().rev().find(|m| m.role == "user"))
            .map_or("", |m| m.content.as_str());
        let request = Request {
            prompt,
            response: x.text.unwrap_or(""),
        };
        serde_json::to_string(&request).expect("two strings serialise")
    }

    /// The error for `failure` at request `index` of the batch (request `number` overall); the
    /// child is killed first so that its stderr is complete.
    fn error(&self, mut child: Running, index: usize, number: usize, failure: Failure) -> R2mError {
        let (status, tail) = child.stop(matches!(failure, Failure::Exited));
        let status = status.map_or(String::new(), |s| format!(" ({s})"));
        let what = match failure {
            Failure::Exited => format!("the command exited{status} before answering"),
            Failure::TimedOut => format!(
                "no answer within {}s (reward.timeout_s)",
                self.timeout.as_secs_f64()
            ),
            Failure::NotANumber(line) => {
                format!("the answer is not a finite JSON number: {:?}", quote(&line))
            }
            Failure::Read(e) => format!("reading the command's stdout failed: {e}"),
            Failure::Unasked(line) => format!(
                "the command wrote a line before this request was sent (more answers than \
                 requests?): {:?}",
                quote(&line)
            ),
        };
        let tail = if tail.is_empty() {
            "nothing on stderr".to_string()
        } else {
            format!("its stderr ends with:\n{tail}")
        };
        R2mError::Other(format!(
            "reward command `{}`: request {index} of the batch (request {number} overall): \
             {what}; {tail}",
            self.command
        ))
    }
}

impl RewardFn for CommandReward {
    fn name(&self) -> String {
        format!("command {}", self.command)
    }

    fn score(&mut self, batch: &[RewardInput<'_>]) -> Result<Vec<f32>> {
        let child = match self.child.take() {
            Some(c) => c,
            None => Running::start(&self.command)?,
        };
        let first = self.sent;
        // Every line so far answered a request: one more would shift every later answer.
        if let Ok(Ok(line)) = child.answers.try_recv() {
            return Err(self.error(child, 0, first, Failure::Unasked(line)));
        }
        // Send the whole batch to the writer thread (it writes while we read the answers).
        let mut text = String::new();
        for x in batch {
            text.push_str(&Self::request_line(x));
            text.push('\n');
        }
        self.sent += batch.len();
        // A closed stdin means the child is gone: the answers below then report it.
        if let Some(requests) = &child.requests {
            let _ = requests.send(text);
        }
        let mut scores = Vec::with_capacity(batch.len());
        for index in 0..batch.len() {
            let answer = match child.answers.recv_timeout(self.timeout) {
                Ok(Ok(line)) => parse_answer(&line).ok_or(Failure::NotANumber(line)),
                Ok(Err(e)) => Err(Failure::Read(e)),
                Err(RecvTimeoutError::Timeout) => Err(Failure::TimedOut),
                Err(RecvTimeoutError::Disconnected) => Err(Failure::Exited),
            };
            match answer {
                Ok(score) => scores.push(score),
                Err(failure) => return Err(self.error(child, index, first + index, failure)),
            }
        }
        self.child = Some(child);
        Ok(scores)
    }
}

/// A finite number from one answer line (surrounding whitespace, `\r` included, is ignored).
fn parse_answer(line: &str) -> Option<f32> {
    let x: f64 = serde_json::from_str(line.trim()).ok()?;
    let x = x as f32;
    x.is_finite().then_some(x)
}

/// The first [`QUOTED_ANSWER`] characters of `s`.
fn quote(s: &str) -> String {
    match s.char_indices().nth(QUOTED_ANSWER) {
        Some((end, _)) => format!("{}...", &s[..end]),
        None => s.to_string(),
    }
}

/// A started child and the threads that serve it.
struct Running {
    child: Child,
    /// Text for the writer thread to write to the child's stdin. Dropping it closes stdin.
    requests: Option<Sender<String>>,
    /// The child's stdout, line by line; disconnected at its end.
    answers: Receiver<std::io::Result<String>>,
    /// The last bytes of the child's stderr.
    stderr: Arc<Mutex<VecDeque<u8>>>,
    /// The stderr drain (finished once the child's stderr is closed).
    drain: JoinHandle<()>,
    /// Whether [`Running::kill`] ran.
    killed: bool,
}

impl Running {
    /// Spawn `sh -c command` with its three threads.
    fn start(command: &str) -> Result<Self> {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().map_err(|e| {
            R2mError::Other(format!(
                "reward command `{command}`: cannot start `sh`: {e}"
            ))
        })?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");

        let (requests, to_write) = mpsc::channel::<String>();
        std::thread::spawn(move || write_requests(stdin, to_write));

        let (send_line, answers) = mpsc::channel();
        std::thread::spawn(move || read_lines(stdout, send_line));

        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL)));
        let ring = tail.clone();
        let drain = std::thread::spawn(move || drain_stderr(stderr, ring));

        Ok(Self {
            child,
            requests: Some(requests),
            answers,
            stderr: tail,
            drain,
            killed: false,
        })
    }

    /// Kill the child and return its exit status (when it could be reaped) and its stderr
    /// tail. A child that `exited` (closed its stdout) is first given up to
    /// [`WAIT_AFTER_FAILURE`] to exit, so that its own status is reported; every child is
    /// given as long for its stderr to arrive.
    fn stop(&mut self, exited: bool) -> (Option<ExitStatus>, String) {
        let deadline = Instant::now() + WAIT_AFTER_FAILURE;
        let mut status = self.child.try_wait().ok().flatten();
        while exited && status.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            status = self.child.try_wait().ok().flatten();
        }
        self.kill();
        // Once the group is dead its stderr closes and the drain finishes (unless something
        // else holds the pipe open: then the tail is what arrived so far).
        while !self.drain.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let tail = self.stderr.lock().expect("stderr tail lock").clone();
        let tail = String::from_utf8_lossy(&Vec::from(tail)).trim().to_string();
        (status, tail)
    }

    /// Close the child's stdin, kill its process group, and reap it (once).
    fn kill(&mut self) {
        if self.killed {
            return;
        }
        self.killed = true;
        self.requests = None;
        #[cfg(unix)]
        {
            // `kill -s KILL -- -PGID`: the whole group (the child is its leader).
            let _ = Command::new("kill")
                .args(["-s", "KILL", "--", &format!("-{}", self.child.id())])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The writer thread: write each text it receives to the child's stdin, until the channel or
/// the pipe closes (dropping `stdin` then closes the child's stdin).
fn write_requests(mut stdin: ChildStdin, texts: Receiver<String>) {
    for text in texts {
        if stdin
            .write_all(text.as_bytes())
            .and_then(|()| stdin.flush())
            .is_err()
        {
            return;
        }
    }
}

/// The reader thread: send each line of the child's stdout (without its newline; invalid UTF-8
/// replaced) until its end; a read error is sent, then the thread ends.
fn read_lines(stdout: impl Read, lines: Sender<std::io::Result<String>>) {
    let mut stdout = BufReader::new(stdout);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match stdout.read_until(b'\n', &mut buf) {
            Ok(0) => return,
            Ok(_) => {
                if buf.last() == Some(&b'\n') {
                    buf.pop();
                }
                let line = String::from_utf8_lossy(&buf).into_owned();
                if lines.send(Ok(line)).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                let _ = lines.send(Err(e));
                return;
            }
        }
    }
}

/// The stderr drain: keep the last [`STDERR_TAIL`] bytes of the child's stderr.
fn drain_stderr(mut stderr: impl Read, tail: Arc<Mutex<VecDeque<u8>>>) {
    let mut buf = [0u8; 1024];
    loop {
        match stderr.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                let mut tail = tail.lock().expect("stderr tail lock");
                tail.extend(&buf[..n]);
                let excess = tail.len().saturating_sub(STDERR_TAIL);
                tail.drain(..excess);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompt::Prompt;
    use r2m_models::generate::FinishReason;
    use r2m_models::ChatMessage;

    #[test]
    fn the_request_is_the_last_user_message_and_the_response_text() {
        let prompt = Prompt {
            ids: vec![1, 2],
            messages: Some(vec![
                ChatMessage::user("first"),
                ChatMessage::new("assistant", "reply"),
                ChatMessage::user("say \"hi\"\nplease"),
                ChatMessage::new("assistant", "partial"),
            ]),
        };
        let x = RewardInput {
            prompt: &prompt,
            response: &[3],
            text: Some("hello"),
            finish: FinishReason::Eos,
        };
        assert_eq!(
            CommandReward::request_line(&x),
            r#"{"prompt":"say \"hi\"\nplease","response":"hello"}"#
        );
        let bare = Prompt {
            ids: vec![1],
            messages: None,
        };
        let x = RewardInput {
            prompt: &bare,
            text: None,
            ..x
        };
        assert_eq!(
            CommandReward::request_line(&x),
            r#"{"prompt":"","response":""}"#
        );
    }

    #[test]
    fn answers_must_be_finite_json_numbers() {
        assert_eq!(parse_answer("0.73"), Some(0.73));
        assert_eq!(parse_answer(" -2\r"), Some(-2.0));
        assert_eq!(parse_answer("1e3"), Some(1000.0));
        for bad in [
            "",
            "nan",
            "NaN",
            "inf",
            "\"0.5\"",
            "0.5 0.6",
            "1e39",
            "not-a-number",
        ] {
            assert_eq!(parse_answer(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_stderr_tail_keeps_the_last_bytes() {
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let text: Vec<u8> = (0..5000u32).map(|i| b'a' + (i % 26) as u8).collect();
        drain_stderr(&text[..], tail.clone());
        let kept: Vec<u8> = tail.lock().unwrap().iter().copied().collect();
        assert_eq!(kept, &text[text.len() - STDERR_TAIL..]);
    }
}
