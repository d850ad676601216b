//! Episodes: multi-turn rows go through the same masked scoring as single-turn ones; the
//! policy-gradient losses see assistant tokens only and the user NLL sees user tokens only.

use candle_core::{Device, Tensor, Var, D};
use rlhf_lm::batch::TokenBatch;
use rlhf_lm::llama::{random_weights, Llama};
use rlhf_lm::score::{
    completion_logprobs, episode_logprobs, gather_logprobs, CompletionBatch, EpisodeBatch,
};
use rlhf_lm::{Episode, Role};
use rlhf_rl::objectives::{masked_nll, masked_sequence_loss, masked_token_loss, sequence_loss};
use rlhf_rl::policy::tiny_config;
use rlhf_rl::rollout::{align, RolloutSample};

const CPU: Device = Device::Cpu;
const VOCAB: usize = 32;

fn model() -> Llama {
    let config = tiny_config(VOCAB);
    let weights = random_weights(&config, 11, 0.1, &CPU).unwrap();
    Llama::from_weights(&config, &weights, &CPU).unwrap()
}

/// prompt, assistant, user, assistant: 11 tokens, 10 targets.
fn conversation() -> Episode {
    Episode::default()
        .with(Role::Prompt, vec![1, 5, 6])
        .with(Role::Assistant, vec![7, 8, 2])
        .with(Role::User, vec![9, 10])
        .with(Role::Assistant, vec![11, 12, 2])
}

/// A shorter single-turn row, so the conversation shares its batch with a padded row.
fn short() -> Episode {
    Episode::single_turn(vec![1, 4], vec![3, 2])
}

// Target j predicts token j + 1. Conversation: targets 0-1 prompt (5, 6), 2-4 assistant (7, 8, 2),
// 5-6 user (9, 10), 7-9 assistant (11, 12, 2). Short row: target 0 prompt (4), 1-2 assistant,
// 3.. padding.
const ASSISTANT: [[f32; 10]; 2] = [
    [0., 0., 1., 1., 1., 0., 0., 1., 1., 1.],
    [0., 1., 1., 0., 0., 0., 0., 0., 0., 0.],
];
const USER: [[f32; 10]; 2] = [[0., 0., 0., 0., 0., 1., 1., 0., 0., 0.], [0.; 10]];
const REAL: [[f32; 10]; 2] = [[1.; 10], [1., 1., 1., 0., 0., 0., 0., 0., 0., 0.]];

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

fn batch() -> EpisodeBatch {
    EpisodeBatch::new(&[conversation(), short()], 0, &CPU).unwrap()
}

#[test]
fn role_masks_follow_the_spans() {
    let b = batch();
    assert_eq!(rows(&b.assistant_mask), ASSISTANT);
    assert_eq!(rows(&b.user_mask), USER);
    assert_eq!(rows(&b.target_mask), REAL);
    assert_eq!(
        conversation().ids(),
        vec![1, 5, 6, 7, 8, 2, 9, 10, 11, 12, 2]
    );
    assert_eq!(conversation().target_mask(Role::User), USER[0].to_vec());

    // An episode must open with prompt context.
    let opens_with_assistant = Episode::default().with(Role::Assistant, vec![3, 4]);
    let err = EpisodeBatch::new(&[opens_with_assistant], 0, &CPU)
        .err()
        .unwrap();
    assert!(err.to_string().contains("episode 0"), "{err}");
    assert!(EpisodeBatch::new(&[Episode::default()], 0, &CPU).is_err());
}

#[test]
fn two_turn_conversation_scores_like_one_span() {
    let m = model();
    let lp = rows(&episode_logprobs(&m, &batch(), 1.0).unwrap());

    // The same 11 tokens as one completion span after the first token, on the existing path.
    let ids = conversation().ids();
    let one_span =
        CompletionBatch::new(&[(ids[..1].to_vec(), ids[1..].to_vec())], 0, &CPU).unwrap();
    let flat = rows(&completion_logprobs(&m, &one_span, 1.0).unwrap());
    assert_eq!(flat[0].len(), 10);
    for j in 0..10 {
        assert!(
            (lp[0][j] - flat[0][j]).abs() < 1e-5,
            "target {j}: {} vs {}",
            lp[0][j],
            flat[0][j]
        );
    }

    // And against a plain log-softmax of the unpadded row's logits.
    let alone = TokenBatch::right_padded(&[ids.clone()], 0, &CPU).unwrap();
    let hidden = m
        .hidden_states(&alone.ids, &alone.positions, &alone.mask, None)
        .unwrap();
    let logits = m.logits(&hidden).unwrap();
    let logp = rows(
        &candle_nn::ops::log_softmax(&logits, D::Minus1)
            .unwrap()
            .squeeze(0)
            .unwrap(),
    );
    for j in 0..10 {
        let reference = logp[j][ids[j + 1] as usize];
        assert!(
            (lp[0][j] - reference).abs() < 1e-5,
            "target {j}: {} vs {reference}",
            lp[0][j]
        );
    }
    // Padding targets of the short row are zero; its real targets are proper log-probs.
    assert!(lp[1][3..].iter().all(|&x| x == 0.0));
    assert!(lp[1][..3].iter().all(|&x| x < 0.0));
}

/// The batch's log-probs as a leaf variable, so the loss's gradient w.r.t. them can be read.
fn logprob_var(m: &Llama, b: &EpisodeBatch) -> (Var, Vec<Vec<f32>>) {
    let lp = episode_logprobs(m, b, 1.0).unwrap().detach();
    let host = rows(&lp);
    (Var::from_tensor(&lp).unwrap(), host)
}

#[test]
fn policy_gradient_touches_assistant_tokens_only() {
    let m = model();
    let b = batch();
    let (lp, host) = logprob_var(&m, &b);

    // Sequence level: loss = -mean_i(A_i * sum_{assistant t} logp_i,t).
    let adv = [1.5, -0.5];
    let loss = masked_sequence_loss(lp.as_tensor(), &b.assistant_mask, &adv).unwrap();
    let sums: Vec<f64> = (0..2)
        .map(|i| {
            (0..10)
                .filter(|&j| ASSISTANT[i][j] == 1.0)
                .map(|j| host[i][j] as f64)
                .sum()
        })
        .collect();
    let expected = -(1.5 * sums[0] - 0.5 * sums[1]) / 2.0;
    let got = loss.to_scalar::<f32>().unwrap() as f64;
    assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
    let grad = rows(loss.backward().unwrap().get(lp.as_tensor()).unwrap());
    for i in 0..2 {
        for j in 0..10 {
            // d loss / d logp_i,t = -A_i / b on assistant tokens, 0 elsewhere.
            let want = if ASSISTANT[i][j] == 1.0 {
                -adv[i] / 2.0
            } else {
                0.0
            };
            assert!(
                (grad[i][j] as f64 - want).abs() < 1e-7,
                "({i}, {j}): {}",
                grad[i][j]
            );
        }
    }

    // Token level, with advantages set on every position (user and prompt ones included):
    // loss = -sum_{assistant} A_i,t * logp_i,t / (number of assistant tokens = 8).
    let a: Vec<Vec<f32>> = (0..2)
        .map(|i| {
            (0..10)
                .map(|j| (j as f32 + 1.0) * if i == 0 { 0.1 } else { -0.2 })
                .collect()
        })
        .collect();
    let a_t = Tensor::new(a.clone(), &CPU).unwrap();
    let loss = masked_token_loss(lp.as_tensor(), &b.assistant_mask, &a_t).unwrap();
    let mut expected = 0.0;
    for i in 0..2 {
        for j in 0..10 {
            if ASSISTANT[i][j] == 1.0 {
                expected -= a[i][j] as f64 * host[i][j] as f64 / 8.0;
            }
        }
    }
    let got = loss.to_scalar::<f32>().unwrap() as f64;
    assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
    let grad = rows(loss.backward().unwrap().get(lp.as_tensor()).unwrap());
    for i in 0..2 {
        for j in 0..10 {
            let want = if ASSISTANT[i][j] == 1.0 {
                -a[i][j] as f64 / 8.0
            } else {
                0.0
            };
            assert!(
                (grad[i][j] as f64 - want).abs() < 1e-7,
                "({i}, {j}): {}",
                grad[i][j]
            );
        }
    }

    // Back to the logits: rows of user and prompt positions get exactly zero gradient.
    let ids = conversation().ids();
    let alone = TokenBatch::right_padded(&[ids.clone()], 0, &CPU).unwrap();
    let hidden = m
        .hidden_states(&alone.ids, &alone.positions, &alone.mask, None)
        .unwrap();
    let logits = Var::from_tensor(&m.logits(&hidden.narrow(1, 0, 10).unwrap()).unwrap()).unwrap();
    let targets = alone.ids.narrow(1, 1, 10).unwrap();
    let lp_row = gather_logprobs(logits.as_tensor(), &targets, 1.0).unwrap(); // (1, 10)
    let mask_row = b.assistant_mask.narrow(0, 0, 1).unwrap();
    let loss = masked_sequence_loss(&lp_row, &mask_row, &[1.5]).unwrap();
    let g = loss.backward().unwrap();
    let g = g
        .get(logits.as_tensor())
        .unwrap()
        .abs()
        .unwrap()
        .sum(D::Minus1)
        .unwrap(); // (1, 10)
    for (j, norm) in rows(&g)[0].iter().enumerate() {
        if ASSISTANT[0][j] == 1.0 {
            assert!(*norm > 1e-3, "assistant target {j} has no gradient");
        } else {
            assert_eq!(*norm, 0.0, "non-assistant target {j} has a gradient");
        }
    }
}

#[test]
fn user_nll_is_minus_the_user_log_probs() {
    let m = model();
    let b = batch();
    let (lp, host) = logprob_var(&m, &b);
    let nll = masked_nll(lp.as_tensor(), &b.user_mask).unwrap();
    // User tokens 9 and 10 are targets 5 and 6 of the conversation; the short row has none.
    let expected = -(host[0][5] as f64 + host[0][6] as f64);
    let got = nll.to_scalar::<f32>().unwrap() as f64;
    assert!(expected > 0.0);
    assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
    let grad = rows(nll.backward().unwrap().get(lp.as_tensor()).unwrap());
    for i in 0..2 {
        for j in 0..10 {
            assert_eq!(grad[i][j], -USER[i][j], "({i}, {j})");
        }
    }
}

fn sample(prompt_ids: Vec<u32>, completion_ids: Vec<u32>, logprobs: Vec<f32>) -> RolloutSample {
    RolloutSample {
        prompt: String::new(),
        prompt_ids,
        completion: String::new(),
        completion_ids,
        ref_logprobs: vec![0.0; logprobs.len()],
        logprobs,
        raw_score: 0.0,
        score: 0.0,
        finished: true,
    }
}

#[test]
fn rollout_samples_are_one_span_episodes_with_the_same_numbers() {
    let m = model();
    let samples = [
        sample(vec![1, 5, 6, 7], vec![8, 2], vec![-0.5, -0.25]),
        sample(
            vec![1, 9],
            vec![10, 11, 12, 2],
            vec![-1.0, -2.0, -3.0, -4.0],
        ),
    ];
    let episodes: Vec<Episode> = samples.iter().map(RolloutSample::episode).collect();
    let eb = EpisodeBatch::new(&episodes, 0, &CPU).unwrap();
    let pairs: Vec<_> = samples
        .iter()
        .map(|s| (s.prompt_ids.clone(), s.completion_ids.clone()))
        .collect();
    let cb = CompletionBatch::new(&pairs, 0, &CPU).unwrap();

    // Completion targets: row 0 indices 3-4, row 1 indices 1-4 (width 5 = 6 tokens - 1).
    let completion = [[0., 0., 0., 1., 1.], [0., 1., 1., 1., 1.]];
    assert_eq!(rows(&eb.assistant_mask), completion);
    assert_eq!(rows(&cb.completion_mask), completion);
    assert_eq!(rows(&eb.user_mask), [[0.; 5]; 2]);

    // Sampled log-probs land where `align` puts them.
    let sampled: Vec<&[f32]> = samples.iter().map(|s| s.logprobs.as_slice()).collect();
    let placed = [[0., 0., 0., -0.5, -0.25], [0., -1., -2., -3., -4.]];
    assert_eq!(
        rows(&eb.scatter(Role::Assistant, &sampled).unwrap()),
        placed
    );
    assert_eq!(rows(&align(&cb, &sampled, &CPU).unwrap()), placed);

    // The same numbers as the single-turn path: log-probs and the REINFORCE loss. Not bit for bit:
    // the episode path runs the LM head on every real target, the single-turn path on the
    // completion targets only, and the matrix multiply rounds a row differently depending on how
    // many rows it gets (a last-place difference, here up to 1e-6).
    let ep = episode_logprobs(&m, &eb, 1.0).unwrap();
    let assistant_lp = ep.broadcast_mul(&eb.assistant_mask).unwrap();
    let single = completion_logprobs(&m, &cb, 1.0).unwrap();
    for (ra, rb) in rows(&assistant_lp).iter().zip(rows(&single)) {
        for (x, y) in ra.iter().zip(&rb) {
            assert!((x - y).abs() <= 4e-6 * y.abs().max(1.0), "{x} vs {y}");
            assert_eq!(*x == 0.0, *y == 0.0, "{x} vs {y}: masked entries differ");
        }
    }
    let adv = [0.75, -1.25];
    let a = masked_sequence_loss(&ep, &eb.assistant_mask, &adv)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let b = sequence_loss(&single, &adv)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((a - b).abs() <= 4e-6 * b.abs().max(1.0), "{a} vs {b}");
}
