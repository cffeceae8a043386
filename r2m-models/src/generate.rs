//! Batched sampling with a KV cache.
//!
//! Prompts of different lengths are left-padded; the padding is masked out of attention and
//! position ids count real tokens only, so a row's tokens do not depend on the rest of the batch.
//! Each row has its own seeded RNG. Greedy and plain temperature sampling pick the tokens where the
//! logits are ([`sample_on_device`]: only the picks and their log-probs come back, not the
//! `[batch, vocab]` logits); top-k and top-p copy the last position's logits to the host and use
//! [`sample`]. Both draw the same uniforms from a row's RNG and pick the same tokens.

use burn::tensor::{backend::Backend, DType, FloatDType, Int, Tensor, TensorData};
use r2m_core::Result;
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::model::{CausalLm, KvCache, Padding};
use crate::tokenizer::Tokenizer;

/// How to sample.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches `p`.
    pub top_p: Option<f32>,
    pub seed: u64,
    /// Stop a row when its decoded text contains one of these (the text is cut before it).
    pub stop_strings: Vec<String>,
    /// Stop a row after it emits one of these ids (the checkpoint's EOS if empty).
    pub eos_token_ids: Vec<u32>,
    /// EOS cannot be sampled before this many new tokens (as HF's `min_new_tokens`); benchmarks
    /// set it to `max_new_tokens` so that every row runs to the end.
    #[serde(default)]
    pub min_new_tokens: usize,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
            stop_strings: Vec::new(),
            eos_token_ids: Vec::new(),
            min_new_tokens: 0,
        }
    }
}

/// Why a row stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum FinishReason {
    Eos,
    StopString,
    Length,
}

/// One generated completion.
#[derive(Debug, Clone)]
pub struct Generation {
    /// New token ids (including the EOS that ended it, if any).
    pub tokens: Vec<u32>,
    /// `log p(token)` under the model's distribution at the sampling temperature (logits /
    /// temperature, before top-k/top-p and before `min_new_tokens`' EOS ban; the raw logits when
    /// greedy), one per token: what a log-prob pass over the sequence computes.
    pub logprobs: Vec<f32>,
    /// Decoded completion without special tokens, cut at a stop string (when a tokenizer is given).
    pub text: Option<String>,
    pub finish: FinishReason,
}

/// What [`generate_keeping`] keeps of the decoding passes besides the tokens: the tensors a
/// log-prob pass over the same sequences would compute, so that an RL step need not run it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Keep {
    /// Keep the residual stream entering this block (the output of blocks `0..layer`).
    pub stream_at: Option<usize>,
    /// Keep the last-layer hidden states (after the final norm).
    pub hidden: bool,
}

/// The tensors [`Keep`] asks for, over the positions the decoding passes fed: each row's
/// left-padded prompt (`prompt_cols` columns) and then every sampled token but the last.
/// Columns past a row's end (after its EOS) hold values of padding, which attention never reads.
///
/// # Shapes
/// - `stream`, `hidden`: `[batch, prompt_cols + steps - 1, hidden]`, where `steps` is the longest
///   row's token count
#[derive(Debug, Clone)]
pub struct Kept<B: Backend> {
    pub stream: Option<Tensor<B, 3>>,
    pub hidden: Option<Tensor<B, 3>>,
    pub prompt_cols: usize,
}

/// Generate a completion for each prompt (token ids), in one batch.
pub fn generate<B: Backend>(
    model: &CausalLm<B>,
    tokenizer: Option<&Tokenizer>,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
) -> Result<Vec<Generation>> {
    Ok(generate_keeping(model, tokenizer, prompts, cfg, Keep::default())?.0)
}

/// [`generate`], also keeping what `keep` asks for of the decoding passes.
///
/// Rows with the same prompt (an RL step's K samples of one prompt) share its prefill: each
/// distinct prompt runs through the model once, and its KV cache is then copied to every row
/// that samples from it.
pub fn generate_keeping<B: Backend>(
    model: &CausalLm<B>,
    tokenizer: Option<&Tokenizer>,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    keep: Keep,
) -> Result<(Vec<Generation>, Kept<B>)> {
    let dev = model.device();
    let b = prompts.len();
    let max_len = prompts.iter().map(Vec::len).max().unwrap_or(0).max(1);
    if b == 0 {
        let kept = Kept {
            stream: None,
            hidden: None,
            prompt_cols: max_len,
        };
        return Ok((Vec::new(), kept));
    }
    let mut eos: Vec<u32> = cfg.eos_token_ids.clone();
    if eos.is_empty() {
        eos.extend(model.config.eos_token_id);
        eos.extend(tokenizer.and_then(Tokenizer::eos_id));
    }
    let pad = eos.first().copied().unwrap_or(0);
    // The distinct prompts, and which one each row samples from.
    let mut distinct: Vec<&Vec<u32>> = Vec::new();
    let mut first_of: std::collections::HashMap<&Vec<u32>, usize> = Default::default();
    let of_row: Vec<usize> = prompts
        .iter()
        .map(|p| {
            *first_of.entry(p).or_insert_with(|| {
                distinct.push(p);
                distinct.len() - 1
            })
        })
        .collect();
    // The distinct prompts left-padded: [pad .. pad, prompt].
    let u = distinct.len();
    let mut ids = Vec::with_capacity(u * max_len);
    let mut valid = Vec::with_capacity(u);
    for p in &distinct {
        let n_pad = max_len - p.len();
        ids.extend(std::iter::repeat_n(pad as i64, n_pad));
        ids.extend(p.iter().map(|&t| t as i64));
        valid.push((0..max_len).map(|i| i >= n_pad).collect::<Vec<_>>());
    }
    let prefill_padding = Padding { valid };
    let mut padding = Padding {
        valid: of_row
            .iter()
            .map(|&i| prefill_padding.valid[i].clone())
            .collect(),
    };
    let mut cache = KvCache::with_capacity(model.config.num_layers, max_len + cfg.max_new_tokens);
    let mut rngs: Vec<StdRng> = (0..b)
        .map(|r| StdRng::seed_from_u64(cfg.seed ^ (r as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)))
        .collect();
    let mut out: Vec<Generation> = (0..b)
        .map(|_| Generation {
            tokens: Vec::new(),
            logprobs: Vec::new(),
            text: None,
            finish: FinishReason::Length,
        })
        .collect();
    let mut done = vec![false; b];

    let on_device = cfg.top_k.is_none() && cfg.top_p.is_none_or(|p| p >= 1.0);
    let vocab = model.config.vocab_size;
    // Added to the logits while EOS is not allowed yet (`min_new_tokens`).
    let eos_ban = (cfg.min_new_tokens > 0).then(|| {
        let mut bias = vec![0f32; vocab];
        for &e in &eos {
            if let Some(x) = bias.get_mut(e as usize) {
                *x = f32::NEG_INFINITY;
            }
        }
        Tensor::<B, 2>::from_data(TensorData::new(bias, [1, vocab]), (&dev, DType::F32))
    });
    // The rows of a prefill's outputs, one per row that samples from them.
    let row_index = Tensor::<B, 1, Int>::from_data(
        TensorData::new(of_row.iter().map(|&i| i as i64).collect(), [b]),
        &dev,
    );
    let expand = |t: Tensor<B, 3>| match u < b {
        true => t.select(0, row_index.clone()),
        false => t,
    };
    let (mut streams, mut hiddens) = (Vec::new(), Vec::new());
    let n_layers = model.layers.len();

    let mut input = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [u, max_len]), &dev);
    for step in 0..cfg.max_new_tokens {
        let x = model.embed(input);
        let pad_now = if step == 0 {
            &prefill_padding
        } else {
            &padding
        };
        let x = match keep.stream_at {
            Some(l) => {
                let x = model.forward_layers(x, pad_now, 0..l, Some(&mut cache));
                streams.push(if step == 0 {
                    expand(x.clone())
                } else {
                    x.clone()
                });
                model.forward_layers(x, pad_now, l..n_layers, Some(&mut cache))
            }
            None => model.forward_layers(x, pad_now, 0..n_layers, Some(&mut cache)),
        };
        let mut hidden = model.norm.forward(x);
        if step == 0 {
            // Every row continues from its prompt's cache.
            if u < b {
                cache = cache.select_rows(&of_row);
            }
            if keep.hidden {
                hidden = expand(hidden);
            } else {
                let s = hidden.dims()[1];
                hidden = expand(hidden.narrow(1, s - 1, 1));
            }
        }
        if keep.hidden {
            hiddens.push(hidden.clone());
        }
        let s = hidden.dims()[1];
        let logits = model
            .lm_head(hidden.narrow(1, s - 1, 1))
            .reshape([b, vocab])
            .cast(FloatDType::F32);
        // While EOS is banned it cannot be picked, but the log-probs recorded are the model's
        // (as a log-prob pass over the sequence computes them).
        let ban = (step < cfg.min_new_tokens)
            .then(|| eos_ban.clone().expect("built when min_new_tokens > 0"));
        let picks: Vec<(u32, f32)> = if on_device {
            // One uniform per row still sampling, as `sample` draws.
            let uniforms: Vec<f32> = (0..b)
                .map(|r| {
                    if done[r] || cfg.temperature <= 0.0 {
                        0.0
                    } else {
                        rngs[r].random::<f32>()
                    }
                })
                .collect();
            let (toks, lps) = sample_on_device(logits, cfg.temperature, &uniforms, ban);
            toks.into_iter().zip(lps).collect()
        } else {
            let logits = logits.into_data().to_vec::<f32>().expect("f32 logits");
            (0..b)
                .map(|r| {
                    let row = &logits[r * vocab..(r + 1) * vocab];
                    if done[r] {
                        (pad, 0.0)
                    } else if ban.is_some() {
                        let mut allowed = row.to_vec();
                        for &e in &eos {
                            if let Some(x) = allowed.get_mut(e as usize) {
                                *x = f32::NEG_INFINITY;
                            }
                        }
                        let (tok, _) = sample(&allowed, cfg, &mut rngs[r]);
                        (tok, log_prob(row, tok, cfg.temperature))
                    } else {
                        sample(row, cfg, &mut rngs[r])
                    }
                })
                .collect()
        };
        let mut next = Vec::with_capacity(b);
        for r in 0..b {
            if done[r] {
                next.push(pad as i64);
                continue;
            }
            let (tok, lp) = picks[r];
            let g = &mut out[r];
            g.tokens.push(tok);
            g.logprobs.push(lp);
            next.push(tok as i64);
            if eos.contains(&tok) {
                done[r] = true;
                g.finish = FinishReason::Eos;
            } else if !cfg.stop_strings.is_empty() {
                if let Some(t) = tokenizer {
                    let text = t.decode(&g.tokens, true)?;
                    if cfg.stop_strings.iter().any(|s| text.contains(s.as_str())) {
                        done[r] = true;
                        g.finish = FinishReason::StopString;
                    }
                }
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        padding.push_valid(1);
        input = Tensor::<B, 2, Int>::from_data(TensorData::new(next, [b, 1]), &dev);
    }
    if let Some(t) = tokenizer {
        for g in &mut out {
            let mut text = t.decode(&g.tokens, true)?;
            if let Some(cut) = cfg
                .stop_strings
                .iter()
                .filter_map(|s| text.find(s.as_str()))
                .min()
            {
                text.truncate(cut);
            }
            g.text = Some(text);
        }
    }
    let cat = |parts: Vec<Tensor<B, 3>>| (!parts.is_empty()).then(|| Tensor::cat(parts, 1));
    let kept = Kept {
        stream: cat(streams),
        hidden: cat(hiddens),
        prompt_cols: max_len,
    };
    Ok((out, kept))
}

/// `log sum_j exp(x_ij)` of each row, `[batch, vocab]` -> `[batch, 1]`.
fn log_sum_exp<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let max = x.clone().max_dim(1);
    max.clone() + (x - max).exp().sum_dim(1).log()
}

/// `log p(tok)` under `softmax(logits / temperature)` (the raw logits when greedy).
fn log_prob(logits: &[f32], tok: u32, temperature: f32) -> f32 {
    let t = if temperature > 0.0 { temperature } else { 1.0 };
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l / t));
    let sum: f32 = logits.iter().map(|&l| (l / t - max).exp()).sum();
    logits[tok as usize] / t - max - sum.ln()
}

/// Block length of the two-level prefix sum in [`sample_on_device`]: burn's GPU `cumsum` reads every
/// earlier element for each output (quadratic in the length), so a row of the vocabulary is summed
/// as blocks of 64 and then across the blocks.
const CDF_BLOCK: usize = 64;

/// Greedy or plain temperature sampling of every row of `logits` (`[batch, vocab]`, f32) where the
/// logits are; returns each row's token and its log-probability under the sampling distribution.
///
/// The same picks as [`sample`] without top-k/top-p: greedy is the first index of the maximum;
/// sampling takes the first token whose cumulative probability, in index order, exceeds the row's
/// uniform `u` (drawn on the host from the row's RNG, as [`sample`] draws it). Only the picks
/// leave the device. A `ban` (`[1, vocab]`, `-inf` at tokens that may not be picked yet, 0
/// elsewhere) restricts the picks; the log-probabilities stay the model's, without the ban.
pub fn sample_on_device<B: Backend>(
    logits: Tensor<B, 2>,
    temperature: f32,
    uniforms: &[f32],
    ban: Option<Tensor<B, 2>>,
) -> (Vec<u32>, Vec<f32>) {
    let [b, vocab] = logits.dims();
    let dev = logits.device();
    let scaled = if temperature > 0.0 {
        logits.div_scalar(temperature)
    } else {
        logits
    };
    let pickable = match &ban {
        Some(ban) => scaled.clone() + ban.clone(),
        None => scaled.clone(),
    };
    let max = pickable.clone().max_dim(1);
    let exps = (pickable.clone() - max.clone()).exp();
    let picks = if temperature <= 0.0 {
        pickable.argmax(1)
    } else {
        // Inverse CDF: the pick is the number of tokens whose cumulative probability is <= u.
        let blocks = vocab.div_ceil(CDF_BLOCK);
        let padded = if blocks * CDF_BLOCK > vocab {
            let zeros = Tensor::zeros([b, blocks * CDF_BLOCK - vocab], (&dev, DType::F32));
            Tensor::cat(vec![exps.clone(), zeros], 1)
        } else {
            exps.clone()
        };
        let within = padded.reshape([b, blocks, CDF_BLOCK]).cumsum(2);
        let block_sums = within
            .clone()
            .narrow(2, CDF_BLOCK - 1, 1)
            .reshape([b, blocks]);
        let before = block_sums.clone().cumsum(1) - block_sums.clone();
        let cdf = within + before.unsqueeze_dim::<3>(2);
        let total = block_sums.sum_dim(1);
        let u = Tensor::<B, 2>::from_data(
            TensorData::new(uniforms.to_vec(), [b, 1]),
            (&dev, DType::F32),
        );
        let threshold = (u * total).unsqueeze_dim::<3>(2);
        (cdf - threshold)
            .lower_equal_elem(0.0)
            .int()
            .reshape([b, blocks * CDF_BLOCK])
            .sum_dim(1)
            .clamp_max(vocab as i64 - 1)
    };
    let log_z = match ban {
        Some(_) => log_sum_exp(scaled.clone()),
        None => max + exps.sum_dim(1).log(),
    };
    let logprobs = scaled.gather(1, picks.clone()) - log_z;
    let toks = picks
        .into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .expect("int picks");
    let lps = logprobs.into_data().to_vec::<f32>().expect("f32 log-probs");
    (toks.into_iter().map(|t| t as u32).collect(), lps)
}

/// Pick one token from a row of logits; returns it with its log-probability.
pub fn sample(logits: &[f32], cfg: &GenerationConfig, rng: &mut impl Rng) -> (u32, f32) {
    let t = if cfg.temperature > 0.0 {
        cfg.temperature
    } else {
        1.0
    };
    let scaled: Vec<f32> = logits.iter().map(|&l| l / t).collect();
    let max = scaled.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = scaled.iter().map(|&l| (l - max).exp()).collect();
    let log_z = max + exps.iter().sum::<f32>().ln();
    if cfg.temperature <= 0.0 {
        // First index of the maximum, like torch.argmax.
        let tok = scaled.iter().position(|&l| l == max).unwrap_or(0);
        return (tok as u32, scaled[tok] - log_z);
    }
    let (idx, probs): (Vec<usize>, Vec<f32>) =
        if cfg.top_k.is_none() && cfg.top_p.is_none_or(|p| p >= 1.0) {
            // Plain sampling: the whole vocabulary in index order, no sort (O(vocab)).
            ((0..scaled.len()).collect(), exps)
        } else {
            // Candidates by probability (ties by index): top-k by partial selection, then sorted
            // for the top-p cut.
            let by_prob = |a: &usize, b: &usize| scaled[*b].total_cmp(&scaled[*a]).then(a.cmp(b));
            let mut idx: Vec<usize> = (0..scaled.len()).collect();
            if let Some(k) = cfg.top_k {
                let k = k.clamp(1, idx.len());
                if k < idx.len() {
                    idx.select_nth_unstable_by(k - 1, by_prob);
                    idx.truncate(k);
                }
            }
            idx.sort_unstable_by(by_prob);
            let mut probs: Vec<f32> = idx.iter().map(|&i| exps[i]).collect();
            if let Some(p) = cfg.top_p {
                let total: f32 = probs.iter().sum();
                let mut cum = 0.0;
                let mut keep = probs.len();
                for (j, q) in probs.iter().enumerate() {
                    cum += q / total;
                    if cum >= p {
                        keep = j + 1;
                        break;
                    }
                }
                idx.truncate(keep);
                probs.truncate(keep);
            }
            (idx, probs)
        };
    let total: f32 = probs.iter().sum();
    let mut u = rng.random::<f32>() * total;
    let mut pick = idx[idx.len() - 1];
    for (j, q) in probs.iter().enumerate() {
        if u < *q {
            pick = idx[j];
            break;
        }
        u -= q;
    }
    (pick as u32, scaled[pick] - log_z)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The device path against the host path on the same logits and RNG streams: same tokens, same
    /// log-probs. A vocabulary of 1000 is not a multiple of the CDF block, so the padding is used.
    #[test]
    fn sampling_on_device_picks_what_the_host_picks() {
        use r2m_core::testing::TestBackend;
        let (b, vocab) = (6, 1000);
        let mut data: Vec<f32> = (0..b * vocab)
            .map(|i| ((i as f32 * 0.618).sin() * 4.0 + (i % 7) as f32 * 0.3).powi(2) * 0.4)
            .collect();
        data[2 * vocab + 10] = 1e3; // one row all but certain
        data[3 * vocab + 999] = 1e3; // ... at the last index
        data[4 * vocab + 5] = f32::NEG_INFINITY; // a banned token (EOS before min_new_tokens)
        let dev = Default::default();
        let logits =
            Tensor::<TestBackend, 2>::from_data(TensorData::new(data.clone(), [b, vocab]), &dev);
        for temperature in [0.0, 0.7, 1.0] {
            let cfg = GenerationConfig {
                temperature,
                ..Default::default()
            };
            let mut host_rngs: Vec<StdRng> =
                (0..b).map(|r| StdRng::seed_from_u64(r as u64)).collect();
            let mut dev_rngs = host_rngs.clone();
            for draw in 0..40 {
                let uniforms: Vec<f32> = dev_rngs
                    .iter_mut()
                    .map(|g| {
                        if temperature > 0.0 {
                            g.random::<f32>()
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let (toks, lps) = sample_on_device(logits.clone(), temperature, &uniforms, None);
                for r in 0..b {
                    let (tok, lp) =
                        sample(&data[r * vocab..(r + 1) * vocab], &cfg, &mut host_rngs[r]);
                    assert_eq!(toks[r], tok, "t={temperature} draw {draw} row {r}");
                    assert!(
                        (lps[r] - lp).abs() < 1e-4,
                        "t={temperature} row {r}: {} vs {lp}",
                        lps[r]
                    );
                }
                assert_ne!(toks[4], 5, "a -inf logit is never picked");
            }
            if temperature == 0.0 {
                continue;
            }
            // The draws do spread over the vocabulary (not one token per row).
            let (toks, _) = sample_on_device(
                logits.clone(),
                temperature,
                &[0.1, 0.3, 0.5, 0.7, 0.9, 0.99],
                None,
            );
            assert_ne!(toks[0], toks[1]);
            assert_eq!((toks[2], toks[3]), (10, 999));
        }
    }

    #[test]
    fn greedy_picks_argmax_with_its_log_prob() {
        let cfg = GenerationConfig::default();
        let mut rng = StdRng::seed_from_u64(0);
        let (tok, lp) = sample(&[0.0, 2.0, 1.0, 2.0], &cfg, &mut rng);
        assert_eq!(tok, 1);
        let z = (0f32.exp() + 2f32.exp() * 2.0 + 1f32.exp()).ln();
        assert!((lp - (2.0 - z)).abs() < 1e-6);
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_limits_support() {
        let mut rng = StdRng::seed_from_u64(7);
        let logits = [1.0, 3.0, 2.9, -5.0];
        let cfg = GenerationConfig {
            temperature: 1.0,
            top_k: Some(1),
            ..Default::default()
        };
        for _ in 0..20 {
            assert_eq!(sample(&logits, &cfg, &mut rng).0, 1);
        }
        // p(1) ~ 0.50, p(2) ~ 0.45: top_p 0.9 keeps {1, 2} only.
        let cfg = GenerationConfig {
            temperature: 1.0,
            top_p: Some(0.9),
            ..Default::default()
        };
        let mut seen = [0usize; 4];
        for _ in 0..400 {
            seen[sample(&logits, &cfg, &mut rng).0 as usize] += 1;
        }
        assert_eq!(seen[0] + seen[3], 0, "{seen:?}");
        assert!(seen[1] > 100 && seen[2] > 100, "{seen:?}");
    }

    #[test]
    fn sampling_is_reproducible_for_a_seed() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let cfg = GenerationConfig {
            temperature: 0.8,
            ..Default::default()
        };
        let run = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..30)
                .map(|_| sample(&logits, &cfg, &mut rng).0)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }

    #[test]
    fn plain_and_top_k_sampling_follow_the_softmax() {
        let logits = [0.5f32, 2.0, -1.0, 1.0, 0.0, 1.5];
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        let mut rng = StdRng::seed_from_u64(11);
        let n = 20_000;
        for top_k in [None, Some(3)] {
            let cfg = GenerationConfig {
                temperature: 1.0,
                top_k,
                ..Default::default()
            };
            let mut seen = [0usize; 6];
            for _ in 0..n {
                let (tok, lp) = sample(&logits, &cfg, &mut rng);
                // The log-prob is always under the full, untruncated distribution.
                assert!((lp - (logits[tok as usize] - z.ln())).abs() < 1e-5);
                seen[tok as usize] += 1;
            }
            // Top 3 by logit: tokens 1, 5, 3.
            let support: Vec<usize> = match top_k {
                None => (0..6).collect(),
                Some(_) => vec![1, 5, 3],
            };
            let zs: f32 = support.iter().map(|&i| logits[i].exp()).sum();
            for i in 0..6 {
                let want = if support.contains(&i) {
                    logits[i].exp() / zs
                } else {
                    0.0
                };
                let got = seen[i] as f32 / n as f32;
                assert!(
                    (got - want).abs() < 0.015,
                    "{top_k:?} token {i}: {got} vs {want}"
                );
            }
        }
    }
}
