//! A seedable RNG whose complete state saves to JSON, so a resumed run draws exactly the numbers an
//! uninterrupted one would have.
//!
//! Built on `rand_chacha::ChaCha8Rng` (the rand project's own crate, already in the dependency
//! tree through `rand`): ChaCha is a counter-mode generator, so its whole state is the 32-byte
//! seed, the stream id and the position in the stream, and `ChaCha8Rng` exposes all three
//! (`get_seed`, `get_stream`, `get_word_pos` / `set_word_pos`). Its output for a given seed is
//! documented as portable and stable across versions, unlike `rand::rngs::StdRng`, whose algorithm
//! may change between releases and whose state cannot be read.
//!
//! `TrainRng` implements `rand::RngCore`, so every `rand::Rng` method works on it.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// The data order of an epoch: a permutation that depends only on (seed, epoch), so a resumed run
/// visits the same examples in the same order.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    use rand::{rngs::StdRng, seq::SliceRandom};
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = StdRng::seed_from_u64(seed ^ epoch.wrapping_mul(GOLDEN));
    order.shuffle(&mut rng);
    order
}

/// 2^64 / golden ratio: spreads consecutive integers (iterations, epochs) over the seed space.
pub const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The seed of the named random stream `name` of a run seeded with `seed`: the run's seed XOR the
/// name's bytes read as a big-endian integer (names of at most 8 ASCII bytes, so streams never
/// collide and a name is its own documentation: `"norm"`, `"mb"`, `"pretrain"`). Every consumer of
/// randomness in a run draws from its own stream, so adding draws to one never shifts another.
pub fn stream_seed(seed: u64, name: &str) -> u64 {
    assert!(
        !name.is_empty() && name.len() <= 8 && name.is_ascii(),
        "stream names are 1-8 ASCII bytes: {name:?}"
    );
    seed ^ name.bytes().fold(0u64, |acc, b| (acc << 8) | b as u64)
}

/// The seed of the `index`-th draw (iteration, round) of a per-step stream.
pub fn step_seed(seed: u64, index: u64) -> u64 {
    seed.wrapping_mul(GOLDEN)
        .wrapping_add(index.wrapping_mul(1_000_003))
}

const ALGORITHM: &str = "chacha8";

#[derive(Debug, Clone)]
pub struct TrainRng {
    inner: ChaCha8Rng,
}

/// Everything needed to continue a [`TrainRng`]: the seed (64 hex digits), the stream id and the
/// position in the stream in 32-bit words (a decimal string: it is a u128).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngState {
    pub algorithm: String,
    pub seed: String,
    pub stream: u64,
    pub word_pos: String,
}

impl TrainRng {
    pub fn seed_from_u64(seed: u64) -> Self {
        TrainRng {
            inner: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// An independent generator from the same seed on another stream (e.g. one per purpose —
    /// shuffling, sampling, dropout — so adding draws to one does not shift the others).
    pub fn fork(&self, stream: u64) -> Self {
        let mut inner = ChaCha8Rng::from_seed(self.inner.get_seed());
        inner.set_stream(stream);
        TrainRng { inner }
    }

    pub fn state(&self) -> RngState {
        let seed: String = self
            .inner
            .get_seed()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        RngState {
            algorithm: ALGORITHM.into(),
            seed,
            stream: self.inner.get_stream(),
            word_pos: self.inner.get_word_pos().to_string(),
        }
    }

    pub fn from_state(state: &RngState) -> Result<Self> {
        let bad = |m: String| TrainError::invalid(format!("RNG state: {m}"));
        if state.algorithm != ALGORITHM {
            return Err(bad(format!(
                "algorithm `{}`, expected `{ALGORITHM}`",
                state.algorithm
            )));
        }
        if state.seed.len() != 64 || !state.seed.is_ascii() {
            return Err(bad("`seed` must be 64 hex digits".into()));
        }
        let mut seed = [0u8; 32];
        for (i, b) in seed.iter_mut().enumerate() {
            *b = u8::from_str_radix(&state.seed[2 * i..2 * i + 2], 16)
                .map_err(|_| bad("`seed` must be 64 hex digits".into()))?;
        }
        let pos: u128 = state
            .word_pos
            .parse()
            .map_err(|_| bad(format!("`word_pos` `{}` is not a number", state.word_pos)))?;
        let mut inner = ChaCha8Rng::from_seed(seed);
        inner.set_stream(state.stream);
        inner.set_word_pos(pos);
        Ok(TrainRng { inner })
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self.state()).expect("RNG state serialises")
    }

    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        let state: RngState = serde_json::from_value(v.clone())
            .map_err(|e| TrainError::invalid(format!("RNG state: {e}")))?;
        Self::from_state(&state)
    }
}

impl RngCore for TrainRng {
    fn next_u32(&mut self) -> u32 {
        self.inner.next_u32()
    }
    fn next_u64(&mut self) -> u64 {
        self.inner.next_u64()
    }
    fn fill_bytes(&mut self, dst: &mut [u8]) {
        self.inner.fill_bytes(dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_seeds_are_the_names_ascii() {
        assert_eq!(stream_seed(0, "norm"), 0x6e6f_726d);
        assert_eq!(stream_seed(5, "mb"), 5 ^ 0x6d62);
        assert_eq!(stream_seed(0, "pretrain"), 0x7072_6574_7261_696e);
    }
    use rand::Rng;

    fn draws(rng: &mut TrainRng) -> (Vec<u64>, Vec<u32>, Vec<f64>, Vec<u8>) {
        let mut bytes = vec![0u8; 13];
        rng.fill_bytes(&mut bytes);
        (
            (0..5).map(|_| rng.next_u64()).collect(),
            (0..7).map(|_| rng.next_u32()).collect(), // odd count: ends mid 64-bit word
            (0..5).map(|_| rng.random::<f64>()).collect(),
            bytes,
        )
    }

    #[test]
    fn restore_mid_stream_continues_identically() {
        let mut a = TrainRng::seed_from_u64(1234);
        let _ = draws(&mut a);
        let _ = a.next_u32(); // leave the position at an odd word
        let saved = serde_json::to_string(&a.to_json()).unwrap();
        let expected = draws(&mut a);
        let mut b = TrainRng::from_json(&serde_json::from_str(&saved).unwrap()).unwrap();
        assert_eq!(draws(&mut b), expected);
        assert_eq!(a.state(), b.state());
    }

    #[test]
    fn seeds_and_streams_differ_and_are_reproducible() {
        let mut a = TrainRng::seed_from_u64(7);
        let mut b = TrainRng::seed_from_u64(7);
        assert_eq!(draws(&mut a), draws(&mut b));
        let mut c = TrainRng::seed_from_u64(8);
        assert_ne!(draws(&mut TrainRng::seed_from_u64(7)), draws(&mut c));
        let base = TrainRng::seed_from_u64(7);
        let (mut f1, mut f2) = (base.fork(1), base.fork(2));
        assert_ne!(draws(&mut f1), draws(&mut f2));
        assert_eq!(
            draws(&mut base.fork(1)),
            draws(&mut TrainRng::seed_from_u64(7).fork(1))
        );
    }

    #[test]
    fn bad_state_is_rejected() {
        let mut s = TrainRng::seed_from_u64(1).state();
        s.seed.pop();
        assert!(TrainRng::from_state(&s).is_err());
        let mut s = TrainRng::seed_from_u64(1).state();
        s.algorithm = "pcg".into();
        assert!(TrainRng::from_state(&s).is_err());
        assert!(TrainRng::from_json(&serde_json::json!({"seed": 3})).is_err());
    }
}
