//! Deterministic, seeded train/eval split.

use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};

/// Shuffle `items` with `seed` and split off the last `eval_count` as the eval set.
/// The same inputs and seed always give the same split.
pub fn train_eval_split<T>(mut items: Vec<T>, eval_count: usize, seed: u64) -> (Vec<T>, Vec<T>) {
    let mut rng = StdRng::seed_from_u64(seed);
    items.shuffle(&mut rng);
    let n_train = items.len().saturating_sub(eval_count);
    let eval = items.split_off(n_train);
    (items, eval)
}

/// Label noise: the rows (of `n`) whose preference label to flip, each with probability `p`,
/// seeded. `r2m train-rm --label-noise` and `r2m experiment overopt` use it.
pub fn label_noise_rows(n: usize, p: f64, seed: u64) -> Vec<usize> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x0015_e1ab);
    (0..n).filter(|_| rng.random::<f64>() < p).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_deterministic_disjoint_and_complete() {
        let items: Vec<u32> = (0..100).collect();
        let (a_train, a_eval) = train_eval_split(items.clone(), 12, 5);
        let (b_train, b_eval) = train_eval_split(items.clone(), 12, 5);
        assert_eq!((a_train.clone(), a_eval.clone()), (b_train, b_eval));
        assert_eq!(a_eval.len(), 12);
        let mut all: Vec<u32> = a_train.into_iter().chain(a_eval.clone()).collect();
        all.sort();
        assert_eq!(all, items);
        let (_, c_eval) = train_eval_split(items, 12, 6);
        assert_ne!(a_eval, c_eval);
    }

    #[test]
    fn label_noise_flips_about_the_requested_share() {
        let rows = label_noise_rows(2000, 0.2, 7);
        assert!((300..500).contains(&rows.len()), "{}", rows.len());
        assert_eq!(rows, label_noise_rows(2000, 0.2, 7));
        assert!(label_noise_rows(2000, 0.0, 7).is_empty());
        assert_eq!(label_noise_rows(10, 1.0, 7).len(), 10);
    }
}
