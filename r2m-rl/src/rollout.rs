//! The rollout stage (spec §3 steps 1-3): sample K responses per prompt from the policy snapshot
//! `pi_old`, keeping from the decoding passes what the later stages need of `pi_old`: its
//! log-probs, its last-layer hidden states `h` (R2M) and, with `top:N`, the frozen trunk's output
//! (the step is on-policy: the sampling weights are the old weights). Then one forward pass of the
//! frozen reference for its log-probs, and PPO's critic for its values. Everything lands in an
//! [`Experience`].
//!
//! `rollout.recompute_old_logprobs = true` runs a separate old-policy pass over the sampled
//! sequences instead ([`old_and_ref_pass`]): the reference behaviour, equal within float rounding.
//!
//! The forward-pass helpers here ([`final_hidden`], [`response_hidden`], [`response_logprobs`])
//! are shared with the policy update ([`crate::update`]).

use burn::tensor::activation::log_softmax;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use r2m_core::tensor::{entropy, gather_log_probs, pick_targets};
use r2m_core::{R2mError, Result};
use r2m_models::Tokenizer;
use r2m_models::{
    fused, generate_keeping, CausalLm, Generation, GenerationConfig, Keep, Kept, KvCache, Padding,
    RewardModel,
};

use crate::experience::{widen, Experience, RowSlice, SharedPrompts};
use crate::prompt::Prompt;
use crate::seed::{step_seed, stream};

/// The models the rollout stage runs, on the inner (no-autodiff) backend.
pub struct RolloutModels<'a, B: Backend> {
    /// The policy snapshot `pi_old` that samples.
    pub old: &'a CausalLm<B>,
    /// The frozen reference `pi_ref`.
    pub reference: &'a CausalLm<B>,
    /// PPO's critic.
    pub critic: Option<&'a RewardModel<B>>,
    pub tokenizer: Option<&'a Tokenizer>,
    /// First trainable block (0: everything trains, no frozen trunk).
    pub start_layer: usize,
}

/// How the rollout stage runs.
#[derive(Debug, Clone)]
pub struct RolloutOptions {
    /// The sampling settings (temperature, top-k/p, EOS ids, lengths); its seed is replaced per
    /// generation batch.
    pub generation: GenerationConfig,
    /// Rows generated in one batch.
    pub generation_batch_size: usize,
    /// Rows per forward pass of the old-policy and reference passes.
    pub micro_batch_size: usize,
    /// Keep the old policy's hidden states `h` (R2M).
    pub keep_hidden: bool,
    /// Run a separate old-policy pass instead of keeping its outputs from sampling.
    pub recompute_old: bool,
    /// The padding id of the token grid.
    pub pad: u32,
}

/// Sample `k` responses to each prompt, keep the old policy's log-probs, `h` and frozen stream
/// from sampling (or, with `recompute_old`, run the old-policy pass), and run the reference and
/// critic passes. Returns the experience and the seconds spent sampling.
pub fn rollout<B: Backend>(
    models: &RolloutModels<'_, B>,
    prompts: Vec<Prompt>,
    k: usize,
    opts: &RolloutOptions,
    seed: u64,
) -> Result<(Experience<B>, f64)> {
    if let Some(i) = prompts.iter().position(|p| p.ids.is_empty()) {
        return Err(R2mError::Config(format!("prompt {i} has no tokens")));
    }
    let t0 = std::time::Instant::now();
    let rows: Vec<usize> = (0..prompts.len() * k).map(|r| r / k).collect();
    let keep = Keep {
        stream_at: (models.start_layer > 0 && !opts.recompute_old).then_some(models.start_layer),
        hidden: opts.keep_hidden && !opts.recompute_old,
    };
    let (gens, kept) = sample_keeping(models, &prompts, &rows, opts, seed, keep)?;
    let gen_secs = t0.elapsed().as_secs_f64();
    let mut exp = Experience::new(prompts, k, gens, opts.pad);
    if opts.recompute_old {
        old_and_ref_pass(models, &mut exp, opts);
    } else {
        exp.old_logprobs = exp.responses.iter().map(|g| g.logprobs.clone()).collect();
        let parts = |f: fn(&Kept<B>) -> Option<Tensor<B, 3>>| {
            (kept.iter())
                .map(|k| f(k).map(|t| (t, k.prompt_cols)))
                .collect::<Option<Vec<_>>>()
        };
        exp.stream = parts(|k| k.stream.clone()).map(|p| on_grid(&exp, p));
        exp.hidden = parts(|k| k.hidden.clone()).map(|p| on_grid(&exp, p));
        reference_pass(models, &mut exp, opts);
    }
    Ok((exp, gen_secs))
}

/// Generate for `rows` (prompt indices) in batches of `generation_batch_size`, each batch with
/// its own seed derived from `seed`.
pub fn sample<B: Backend>(
    models: &RolloutModels<'_, B>,
    prompts: &[Prompt],
    rows: &[usize],
    opts: &RolloutOptions,
    seed: u64,
) -> Result<Vec<Generation>> {
    Ok(sample_keeping(models, prompts, rows, opts, seed, Keep::default())?.0)
}

/// [`sample`], keeping what `keep` asks for of each generation batch's decoding passes.
fn sample_keeping<B: Backend>(
    models: &RolloutModels<'_, B>,
    prompts: &[Prompt],
    rows: &[usize],
    opts: &RolloutOptions,
    seed: u64,
    keep: Keep,
) -> Result<(Vec<Generation>, Vec<Kept<B>>)> {
    let (mut out, mut kept) = (Vec::with_capacity(rows.len()), Vec::new());
    for (chunk, idx) in rows.chunks(opts.generation_batch_size.max(1)).enumerate() {
        let ids: Vec<Vec<u32>> = idx.iter().map(|&i| prompts[i].ids.clone()).collect();
        let cfg = GenerationConfig {
            seed: step_seed(seed, chunk, stream::GENERATION_BATCH),
            ..opts.generation.clone()
        };
        let (gens, k) = generate_keeping(models.old, models.tokenizer, &ids, &cfg, keep)?;
        out.extend(gens);
        kept.push(k);
    }
    Ok((out, kept))
}

/// Lay tensors kept by the generation batches (in row order, each `[batch, prompt_cols + steps -
/// 1, d]` with its own prompt padding) out on the experience's grid, `[rows, P + R - 1, d]`:
/// each batch's columns shift right by the difference of prompt paddings, and the columns no row
/// of a batch reached are zeros (padding, which attention never reads).
fn on_grid<B: Backend>(exp: &Experience<B>, parts: Vec<(Tensor<B, 3>, usize)>) -> Tensor<B, 3> {
    let width = exp.prompt_cols + exp.response_cols - 1;
    let rows: Vec<Tensor<B, 3>> = parts
        .into_iter()
        .map(|(t, prompt_cols)| widen(t, exp.prompt_cols - prompt_cols, width))
        .collect();
    Tensor::cat(rows, 0)
}

fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().expect("f32")
}

/// One pass of the old policy (log-probs, `h`, the frozen stream) in micro-batches over the full
/// grid, then the reference and critic passes: what `recompute_old_logprobs = true` runs, and how
/// ReMax's greedy responses get their `h`.
pub fn old_and_ref_pass<B: Backend>(
    models: &RolloutModels<'_, B>,
    exp: &mut Experience<B>,
    opts: &RolloutOptions,
) {
    let (old, start_layer) = (models.old, models.start_layer);
    let dev = old.device();
    let rows: Vec<usize> = (0..exp.rows()).collect();
    let (mut streams, mut hiddens, mut old_lp) = (Vec::new(), Vec::new(), Vec::new());
    for chunk in rows.chunks(opts.micro_batch_size.max(1)) {
        let s = exp.full_slice(chunk);
        let padding = exp.input_padding(&s);
        let ids = exp.input_ids::<B>(&s, &dev);
        let stream = (start_layer > 0)
            .then(|| old.forward_layers(old.embed(ids.clone()), &padding, 0..start_layer, None));
        let h = match &stream {
            Some(x) => final_hidden(old, Start::Stream(x.clone(), start_layer), &padding),
            None => final_hidden(old, Start::Tokens(ids), &padding),
        };
        let targets = exp.targets::<B>(&s, &dev);
        let hr = response_hidden(h.clone(), &s, exp.prompt_cols);
        let (lp, _) = response_logprobs(old, hr, targets, opts.generation.temperature, false);
        old_lp.extend(exp.split_rows(&s, &to_vec(lp)));
        if opts.keep_hidden {
            hiddens.push(h);
        }
        streams.extend(stream);
    }
    exp.old_logprobs = old_lp;
    exp.stream = (!streams.is_empty()).then(|| Tensor::cat(streams, 0));
    exp.hidden = (!hiddens.is_empty()).then(|| Tensor::cat(hiddens, 0));
    reference_pass(models, exp, opts);
}

/// The reference's log-probs and the critic's values over an experience whose old-policy
/// outputs are already in it. With a frozen trunk, both start from its kept output. Rows go
/// through in micro-batches of similar length, each over only the columns its rows need.
pub fn reference_pass<B: Backend>(
    models: &RolloutModels<'_, B>,
    exp: &mut Experience<B>,
    opts: &RolloutOptions,
) {
    let dev = models.reference.device();
    let temp = opts.generation.temperature;
    let rows = exp.by_length(&(0..exp.rows()).collect::<Vec<_>>());
    let mut ref_lp = vec![Vec::new(); exp.rows()];
    let mut values = vec![Vec::new(); exp.rows()];
    for chunk in rows.chunks(opts.micro_batch_size.max(1)) {
        let s = exp.slice(chunk);
        let targets = exp.targets::<B>(&s, &dev);
        let stream = exp.stream_of(&s);
        let start = |m: &CausalLm<B>| match &stream {
            Some(x) => slice_hidden(m, Start::Stream(x.clone(), models.start_layer), exp, &s),
            None => slice_hidden(m, Start::Tokens(exp.input_ids::<B>(&s, &dev)), exp, &s),
        };
        let h = response_hidden(start(models.reference), &s, exp.prompt_cols);
        let (lp, _) = response_logprobs(models.reference, h, targets, temp, false);
        for (&r, v) in chunk.iter().zip(exp.split_rows(&s, &to_vec(lp))) {
            ref_lp[r] = v;
        }
        if let Some(c) = models.critic {
            let hc = response_hidden(start(&c.backbone), &s, exp.prompt_cols);
            let v = c.score.forward(hc).squeeze_dim::<2>(2);
            for (&r, v) in chunk.iter().zip(exp.split_rows(&s, &to_vec(v))) {
                values[r] = v;
            }
        }
    }
    exp.ref_logprobs = ref_lp;
    exp.values = models.critic.is_some().then_some(values);
}

/// Where a forward pass starts.
pub enum Start<B: Backend> {
    /// From token ids (the whole model runs).
    Tokens(Tensor<B, 2, Int>),
    /// From the cached residual stream entering block `layer`.
    Stream(Tensor<B, 3>, usize),
}

/// Last-layer hidden states (after the final norm) of `model` over a slice's input columns.
///
/// # Shapes
/// - returns `[rows, hi - 1 - lo, hidden]`
pub fn final_hidden<B: Backend>(
    model: &CausalLm<B>,
    start: Start<B>,
    padding: &Padding,
) -> Tensor<B, 3> {
    let n = model.layers.len();
    let x = match start {
        Start::Tokens(ids) => model.forward_layers(model.embed(ids), padding, 0..n, None),
        Start::Stream(x, layer) => model.forward_layers(x, padding, layer..n, None),
    };
    model.norm.forward(x)
}

/// [`final_hidden`] with the columns that rows share computed once per group: each group's
/// first row runs them and fills a KV cache, which is forked to the group's rows
/// ([`KvCache::select_rows`]); each row then runs its own columns from the cache. Equal to
/// [`final_hidden`] within float rounding, gradients included (the fork is a row selection, so
/// the backward pass sums each group's rows into its one prefix).
///
/// # Shapes
/// - as [`final_hidden`]; `start` and `padding` cover every column
pub fn final_hidden_shared<B: Backend>(
    model: &CausalLm<B>,
    start: Start<B>,
    padding: &Padding,
    shared: &SharedPrompts,
) -> Tensor<B, 3> {
    let n = model.layers.len();
    let select = |rows: &[usize], dev: &B::Device| {
        let idx: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [rows.len()]), dev)
    };
    let cols = shared.cols;
    let (prefix, rest, layer) = match start {
        Start::Tokens(ids) => {
            let [_, w] = ids.dims();
            let first = select(&shared.first, &ids.device());
            let prefix = model.embed(ids.clone().select(0, first).narrow(1, 0, cols));
            (prefix, model.embed(ids.narrow(1, cols, w - cols)), 0)
        }
        Start::Stream(x, layer) => {
            let [_, w, _] = x.dims();
            let first = select(&shared.first, &x.device());
            let prefix = x.clone().select(0, first).narrow(1, 0, cols);
            (prefix, x.narrow(1, cols, w - cols), layer)
        }
    };
    let dev = prefix.device();
    let prefix_padding = Padding {
        valid: (shared.first.iter())
            .map(|&r| padding.valid[r][..cols].to_vec())
            .collect(),
    };
    let mut cache = KvCache::new(n);
    let prefix = model.forward_layers(prefix, &prefix_padding, layer..n, Some(&mut cache));
    let mut cache = cache.select_rows(&shared.group);
    let rest = model.forward_layers(rest, padding, layer..n, Some(&mut cache));
    let prefix = prefix.select(0, select(&shared.group, &dev));
    model.norm.forward(Tensor::cat(vec![prefix, rest], 1))
}

/// Last-layer hidden states of `model` over the input columns of a slice of `exp`: through
/// [`final_hidden_shared`] when rows of the slice sample the same prompt, else [`final_hidden`].
pub fn slice_hidden<B: Backend, E: Backend>(
    model: &CausalLm<B>,
    start: Start<B>,
    exp: &Experience<E>,
    s: &RowSlice,
) -> Tensor<B, 3> {
    let padding = exp.input_padding(s);
    match exp.shared_prompts(s) {
        Some(shared) => final_hidden_shared(model, start, &padding, &shared),
        None => final_hidden(model, start, &padding),
    }
}

/// Hidden states at the columns that predict response tokens, `[rows, hi - P, hidden]`.
pub fn response_hidden<B: Backend>(
    hidden: Tensor<B, 3>,
    s: &RowSlice,
    prompt_cols: usize,
) -> Tensor<B, 3> {
    hidden.narrow(1, prompt_cols - 1 - s.lo, s.hi - prompt_cols)
}

/// The log-prob of each target under `softmax(logits / temperature)`, and each position's entropy.
///
/// The entropy has a gradient only with `entropy_grad` (an entropy bonus in the loss); otherwise
/// both come from [`r2m_models::fused::token_log_probs_with_entropy`], which on the CPU backend
/// never builds the `[rows, r, vocab]` log-softmax (the entropy is then a metric, no gradient).
///
/// # Shapes
/// - `response_hidden`: `[rows, r, hidden]`, `targets`: `[rows, r]` -> `([rows, r], [rows, r])`
pub fn response_logprobs<B: Backend>(
    model: &CausalLm<B>,
    response_hidden: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    temperature: f32,
    entropy_grad: bool,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let logits = model.lm_head(response_hidden);
    let logits = if temperature != 1.0 {
        logits.div_scalar(temperature)
    } else {
        logits
    };
    if !entropy_grad {
        return fused::token_log_probs_with_entropy(logits, targets);
    }
    let log_probs = log_softmax(logits, 2);
    (pick_targets(log_probs.clone(), targets), entropy(log_probs))
}

/// Log-probs of the response tokens of `rows` under `model` from token ids (the whole model),
/// as per-row vectors. Used by tests and tools that need a plain recomputation.
pub fn recompute_logprobs<B: Backend>(
    model: &CausalLm<B>,
    exp: &Experience<B>,
    rows: &[usize],
    temperature: f32,
) -> Vec<Vec<f32>> {
    let dev = model.device();
    let s = exp.slice(rows);
    let hidden = final_hidden(
        model,
        Start::Tokens(exp.input_ids::<B>(&s, &dev)),
        &exp.input_padding(&s),
    );
    let logits = model.lm_head(response_hidden(hidden, &s, exp.prompt_cols));
    let logp = gather_log_probs(logits.div_scalar(temperature), exp.targets::<B>(&s, &dev));
    let flat: Vec<f32> = logp.into_data().convert::<f32>().to_vec().expect("f32");
    exp.split_rows(&s, &flat)
}
