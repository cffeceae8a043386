//! Deterministic, seeded train/eval split.

use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};

/// Shuffle `items` with `seed` and split off the last `eval_count` as the eval set.
/// The same inputs and seed always give the same split.
pub fn train_eval_split<T>(mut items: Vec<T>, eval_count: usize, seed: u64) -> (Vec<T>, Vec<T>) {
    let mut rng = StdRng::seed_from_u64(seed);
    items.shuffle(&mut rng);
    let n_train = items.len().saturating_sub(eval_count);
    let eval = items.split_off(n_train);
    (items, eval)
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
}
