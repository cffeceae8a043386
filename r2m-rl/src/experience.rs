//! The experience of one RL step: one value that every stage of the step fills in turn and later
//! stages read, so that data flows one way (spec §3, Algorithm 1):
//!
//! 1. rollout ([`crate::rollout`]): prompts, sampled responses, the token grid, the old and
//!    reference log-probs, the old policy's hidden states `h`, the frozen trunk's output
//!    (`stream`) and PPO's values;
//! 2. reward ([`crate::reward::RolloutReward::score_experience`]): the raw scores, the reward model's
//!    `H_last`, the rewards after the missing-EOS penalty and ReMax's greedy rewards;
//! 3. advantage ([`crate::advantage::compute`]): per-token advantages and PPO's returns.
//!
//! The policy update reads it and returns the refreshed hidden states `h'`; the reward model's
//! update (R2M) reads it and `h'`. Nothing writes back into it after the advantages.
//!
//! Layout: the experience holds one `[rows, P + R]` token grid, prompts left-padded to `P` columns and
//! responses right-padded to `R`, as generation produced them. The forward pass reads columns
//! `0..P+R-1` (the sequence without its last token); the logits at column `c` predict the token at
//! `c + 1`, so response token `t` is predicted at column `P - 1 + t`.
//!
//! With a frozen lower body (`model.trainable = "top:N"`), the old-policy pass also keeps the
//! residual stream entering the first trainable block: it is the same for every later forward
//! pass of this step (the lower body never changes), so the reference and the training passes run
//! only the top blocks.

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use r2m_models::generate::FinishReason;
use r2m_models::{Generation, Padding};

use crate::prompt::Prompt;

/// One vector per response, one value per response token.
pub type PerToken = Vec<Vec<f32>>;

/// One sequence to score: what a reward function sees of an experience row.
#[derive(Debug, Clone, Copy)]
pub struct RewardInput<'a> {
    pub prompt: &'a Prompt,
    /// Response token ids, including the EOS that ended it (if any).
    pub response: &'a [u32],
    /// The decoded response without special tokens (when the policy has a tokenizer).
    pub text: Option<&'a str>,
    pub finish: FinishReason,
}

/// Sampled responses with everything the later stages of the step need.
pub struct Experience<B: Backend> {
    /// The step's prompts (n).
    pub prompts: Vec<Prompt>,
    /// K: row `i * k + j` is sample `j` of prompt `i`.
    pub k: usize,
    /// One per row.
    pub responses: Vec<Generation>,
    /// `[rows, P + R]` token ids (padding holds the pad id).
    pub ids: Vec<i64>,
    /// Which cells of the grid are real tokens.
    pub padding: Padding,
    /// P
    pub prompt_cols: usize,
    /// R
    pub response_cols: usize,
    /// `log pi_old(y_t)` per response token (at the sampling temperature).
    pub old_logprobs: Vec<Vec<f32>>,
    /// `log pi_ref(y_t)` per response token (same temperature).
    pub ref_logprobs: Vec<Vec<f32>>,
    /// The residual stream entering the first trainable block over the input columns,
    /// `[rows, P + R - 1, hidden]` (only with a frozen lower body).
    pub stream: Option<Tensor<B, 3>>,
    /// `h`: the old policy's last-layer hidden states (after the final norm) over the input
    /// columns, `[rows, P + R - 1, hidden]` (kept when requested, for R2M).
    pub hidden: Option<Tensor<B, 3>>,
    /// The critic's values per response token (PPO only).
    pub values: Option<PerToken>,
    /// The reward function's raw score of each row.
    pub scores: Vec<f32>,
    /// `H_last`: the reward model's final-norm hidden state at each row's last token, when the
    /// reward keeps it for its own update (R2M and the controls that train a head).
    pub rm_hidden: Option<Tensor<B, 2>>,
    /// ReMax: the reward of each prompt's greedy response (the baseline).
    pub greedy_rewards: Option<Vec<f32>>,
    /// The rewards the advantages use: the scores after the missing-EOS penalty.
    pub rewards: Vec<f32>,
    /// Per-token advantages.
    pub advantages: PerToken,
    /// PPO's returns (the critic's targets).
    pub returns: Option<PerToken>,
}

/// The columns a forward pass over some rows needs: inputs `lo..hi - 1`, response targets `P..hi`.
#[derive(Debug, Clone)]
pub struct RowSlice {
    pub rows: Vec<usize>,
    pub lo: usize,
    pub hi: usize,
}

/// `t` (`[rows, w, d]`) widened to `width` columns with zeros: `left` columns before it, the
/// rest after. How tensors over some columns of the grid go back onto all of them.
pub fn widen<B: Backend>(t: Tensor<B, 3>, left: usize, width: usize) -> Tensor<B, 3> {
    let [n, w, d] = t.dims();
    let right = width - left - w;
    if left == 0 && right == 0 {
        return t;
    }
    let zeros = |k: usize| Tensor::<B, 3>::zeros([n, k, d], &t.device());
    let mut cols = Vec::with_capacity(3);
    if left > 0 {
        cols.push(zeros(left));
    }
    cols.push(t.clone());
    if right > 0 {
        cols.push(zeros(right));
    }
    Tensor::cat(cols, 1)
}

/// How the rows of a slice share their prompts: the first `cols` input columns of row `i` are
/// those of row `first[group[i]]` (same prompt, same left padding).
#[derive(Debug, Clone, PartialEq)]
pub struct SharedPrompts {
    /// Input columns every row of a group has in common (its prompt without the last token).
    pub cols: usize,
    /// Per group, the slice row (index into the slice's rows) that runs the common columns.
    pub first: Vec<usize>,
    /// Per slice row, its group.
    pub group: Vec<usize>,
}

impl<B: Backend> Experience<B> {
    /// Lay out `prompts` (n) and their `responses` (n * k, grouped by prompt) as one grid.
    pub fn new(prompts: Vec<Prompt>, k: usize, responses: Vec<Generation>, pad: u32) -> Self {
        assert_eq!(prompts.len() * k, responses.len(), "k responses per prompt");
        let p = prompts.iter().map(|x| x.ids.len()).max().unwrap_or(0);
        let r = responses
            .iter()
            .map(|g| g.tokens.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let rows = responses.len();
        let mut ids = Vec::with_capacity(rows * (p + r));
        let mut valid = Vec::with_capacity(rows);
        for (row, g) in responses.iter().enumerate() {
            let prompt = &prompts[row / k].ids;
            let n_pad = p - prompt.len();
            ids.extend(std::iter::repeat_n(pad as i64, n_pad));
            ids.extend(prompt.iter().map(|&t| t as i64));
            ids.extend(g.tokens.iter().map(|&t| t as i64));
            ids.extend(std::iter::repeat_n(pad as i64, r - g.tokens.len()));
            valid.push(
                (0..p + r)
                    .map(|c| c >= n_pad && c < p + g.tokens.len())
                    .collect(),
            );
        }
        Self {
            prompts,
            k,
            responses,
            ids,
            padding: Padding { valid },
            prompt_cols: p,
            response_cols: r,
            old_logprobs: Vec::new(),
            ref_logprobs: Vec::new(),
            stream: None,
            hidden: None,
            values: None,
            scores: Vec::new(),
            rm_hidden: None,
            greedy_rewards: None,
            rewards: Vec::new(),
            advantages: Vec::new(),
            returns: None,
        }
    }

    pub fn rows(&self) -> usize {
        self.responses.len()
    }

    /// Response length (tokens) of `row`.
    pub fn response_len(&self, row: usize) -> usize {
        self.responses[row].tokens.len()
    }

    pub fn prompt_of(&self, row: usize) -> &Prompt {
        &self.prompts[row / self.k]
    }

    /// What a reward function sees for each row.
    pub fn reward_inputs(&self) -> Vec<RewardInput<'_>> {
        self.responses
            .iter()
            .enumerate()
            .map(|(row, g)| RewardInput {
                prompt: self.prompt_of(row),
                response: &g.tokens,
                text: g.text.as_deref(),
                finish: g.finish,
            })
            .collect()
    }

    /// `rows` ordered by prompt length, then prompt, then response length: cut into
    /// micro-batches, rows of similar length share a forward pass and pad little, and the samples
    /// of one prompt sit together (their prompt then runs once, [`Experience::shared_prompts`]).
    pub fn by_length(&self, rows: &[usize]) -> Vec<usize> {
        let mut rows = rows.to_vec();
        rows.sort_by_key(|&r| {
            (
                self.prompt_of(r).ids.len(),
                r / self.k,
                self.response_len(r),
            )
        });
        rows
    }

    /// The rows of a slice that sample the same prompt, when any do: a forward pass can run
    /// their common columns once (`crate::rollout::final_hidden_shared`). Those columns are the
    /// slice's prompt columns but the last, `lo..P - 1`: the last prompt token predicts the first
    /// response token, so it runs with each row's own part. `None` when every row has its own
    /// prompt or there is no such column.
    pub fn shared_prompts(&self, s: &RowSlice) -> Option<SharedPrompts> {
        let cols = (self.prompt_cols - 1).saturating_sub(s.lo);
        let (mut first, mut group) = (Vec::new(), Vec::with_capacity(s.rows.len()));
        let mut prompts: Vec<usize> = Vec::new();
        for (i, &r) in s.rows.iter().enumerate() {
            let prompt = r / self.k;
            let g = match prompts.iter().position(|&p| p == prompt) {
                Some(g) => g,
                None => {
                    prompts.push(prompt);
                    first.push(i);
                    prompts.len() - 1
                }
            };
            group.push(g);
        }
        (cols > 0 && first.len() < s.rows.len()).then_some(SharedPrompts { cols, first, group })
    }

    /// The columns `rows` need (left columns that are padding in every row are dropped, and so
    /// are right columns past the longest response).
    pub fn slice(&self, rows: &[usize]) -> RowSlice {
        let p = self.prompt_cols;
        let lo = rows
            .iter()
            .map(|&r| p - self.prompt_of(r).ids.len())
            .min()
            .unwrap_or(0)
            .min(p.saturating_sub(1));
        let hi = p + rows
            .iter()
            .map(|&r| self.response_len(r))
            .max()
            .unwrap_or(1)
            .max(1);
        RowSlice {
            rows: rows.to_vec(),
            lo,
            hi,
        }
    }

    /// The same rows over every column (how the old-policy pass runs, so that its stream and
    /// hidden states cover the full grid).
    pub fn full_slice(&self, rows: &[usize]) -> RowSlice {
        RowSlice {
            rows: rows.to_vec(),
            lo: 0,
            hi: self.prompt_cols + self.response_cols,
        }
    }

    fn cols(&self) -> usize {
        self.prompt_cols + self.response_cols
    }

    /// Input token ids `[rows, hi - 1 - lo]`.
    pub fn input_ids<B2: Backend>(&self, s: &RowSlice, dev: &B2::Device) -> Tensor<B2, 2, Int> {
        let w = s.hi - 1 - s.lo;
        let c = self.cols();
        let mut v = Vec::with_capacity(s.rows.len() * w);
        for &r in &s.rows {
            v.extend_from_slice(&self.ids[r * c + s.lo..r * c + s.hi - 1]);
        }
        Tensor::from_data(TensorData::new(v, [s.rows.len(), w]), dev)
    }

    /// Padding of the input columns.
    pub fn input_padding(&self, s: &RowSlice) -> Padding {
        Padding {
            valid: s
                .rows
                .iter()
                .map(|&r| self.padding.valid[r][s.lo..s.hi - 1].to_vec())
                .collect(),
        }
    }

    /// Response tokens `[rows, hi - P]` (targets of the log-probs).
    pub fn targets<B2: Backend>(&self, s: &RowSlice, dev: &B2::Device) -> Tensor<B2, 2, Int> {
        let (p, c) = (self.prompt_cols, self.cols());
        let w = s.hi - p;
        let mut v = Vec::with_capacity(s.rows.len() * w);
        for &r in &s.rows {
            v.extend_from_slice(&self.ids[r * c + p..r * c + s.hi]);
        }
        Tensor::from_data(TensorData::new(v, [s.rows.len(), w]), dev)
    }

    /// 1.0 at real response tokens, `[rows, hi - P]`.
    pub fn response_mask<B2: Backend>(&self, s: &RowSlice, dev: &B2::Device) -> Tensor<B2, 2> {
        let w = s.hi - self.prompt_cols;
        let v: Vec<f32> = s
            .rows
            .iter()
            .flat_map(|&r| {
                let n = self.response_len(r);
                (0..w).map(move |t| if t < n { 1.0 } else { 0.0 })
            })
            .collect();
        Tensor::from_data(TensorData::new(v, [s.rows.len(), w]), dev)
    }

    /// Per-token host values of `rows` as `[rows, hi - P]`, zero-padded.
    pub fn per_token<B2: Backend>(
        &self,
        s: &RowSlice,
        values: &[Vec<f32>],
        dev: &B2::Device,
    ) -> Tensor<B2, 2> {
        let w = s.hi - self.prompt_cols;
        let mut v = Vec::with_capacity(s.rows.len() * w);
        for &r in &s.rows {
            v.extend_from_slice(&values[r]);
            v.extend(std::iter::repeat_n(0.0, w - values[r].len()));
        }
        Tensor::from_data(TensorData::new(v, [s.rows.len(), w]), dev)
    }

    /// The cached stream for a slice, narrowed to its input columns.
    pub fn stream_of(&self, s: &RowSlice) -> Option<Tensor<B, 3>> {
        self.stream.as_ref().map(|st| {
            let idx: Vec<i64> = s.rows.iter().map(|&r| r as i64).collect();
            let idx =
                Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [s.rows.len()]), &st.device());
            st.clone().select(0, idx).narrow(1, s.lo, s.hi - 1 - s.lo)
        })
    }

    /// Drop padding columns of host per-token values `[rows, hi - P]` into per-row vectors.
    pub fn split_rows(&self, s: &RowSlice, flat: &[f32]) -> Vec<Vec<f32>> {
        let w = s.hi - self.prompt_cols;
        s.rows
            .iter()
            .enumerate()
            .map(|(i, &r)| flat[i * w..i * w + self.response_len(r)].to_vec())
            .collect()
    }
}
