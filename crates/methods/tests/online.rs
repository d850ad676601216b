//! Online methods: each estimator's advantages and loss against hand-computed values on fixed
//! rewards and log-probs, the rollout engine, the reward sources (a command, and an HTTP endpoint
//! served by a thread on 127.0.0.1 that answers, times out or returns junk), and short runs on
//! the tiny model: determinism across a resume, and a failing reward endpoint stopping a run with
//! its last checkpoint intact.

mod common;
use common::{assert_all_close, close, metrics, scratch, tiny_model, CPU};

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Tensor, Var};
use rlhf_data::testbed::{task_by_name, tokenizer_for};
use rlhf_methods::{grpo, raft, reinforce, rloo, vanilla_pg};
use rlhf_rl::kl::{k3, k3_tensor, sequence_kl, shaped_reward, KlConfig, KlController};
use rlhf_rl::online::{split_groups, OnlineConfig};
use rlhf_rl::policy::fresh_tiny;
use rlhf_rl::reward_source::{
    parse_scores, CommandSource, HttpSource, Query, RewardSource, Rewarder, SourceKind,
};
use rlhf_rl::rollout::{align, collect, Policies, Rollout, RolloutConfig, RolloutSample};
use rlhf_train::RunDir;

// ---- estimators on fixed numbers -----------------------------------------------------------------

/// RLOO: each sample's baseline is the mean of the *other* k - 1 rewards of its prompt.
#[test]
fn rloo_baseline_excludes_the_sample_itself() {
    // Group 1: [1, 2, 3, 6]; group 2: [0, 0, 0, 4].
    let r = [1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 4.0];
    let a = rloo::advantages(&r, 4);
    let want = [
        1.0 - (2.0 + 3.0 + 6.0) / 3.0, // -2.6667
        2.0 - (1.0 + 3.0 + 6.0) / 3.0, // -1.3333
        3.0 - (1.0 + 2.0 + 6.0) / 3.0, // 0
        6.0 - (1.0 + 2.0 + 3.0) / 3.0, // 4
        0.0 - 4.0 / 3.0,
        0.0 - 4.0 / 3.0,
        0.0 - 4.0 / 3.0,
        4.0,
    ];
    assert_all_close(&a, &want, 1e-12);
    // Equivalently k / (k - 1) * (R_i - mean): no division by the std.
    assert!(close(a[3], 4.0 / 3.0 * (6.0 - 3.0), 1e-12));
    // k = 2: A = +-(R_1 - R_2).
    assert_all_close(&rloo::advantages(&[0.5, -1.5], 2), &[2.0, -2.0], 1e-12);
}

fn sample_with(score: f64, logprobs: &[f32], ref_logprobs: &[f32]) -> RolloutSample {
    RolloutSample {
        prompt: "p".into(),
        prompt_ids: vec![1],
        completion: "c".into(),
        completion_ids: (0..logprobs.len() as u32).map(|i| 4 + i).collect(),
        logprobs: logprobs.to_vec(),
        ref_logprobs: ref_logprobs.to_vec(),
        raw_score: score,
        score,
        finished: true,
    }
}

/// The leave-one-out baseline is taken on the KL-shaped reward R = r - beta * sum(logp - ref).
#[test]
fn rloo_uses_the_kl_shaped_reward() {
    let rollout = Rollout {
        k: 2,
        samples: vec![
            // kl = (-1 + 2) + (-0.5 + 0.25) = 0.75
            sample_with(1.0, &[-1.0, -0.5], &[-2.0, -0.25]),
            // kl = -0.5
            sample_with(0.5, &[-1.5], &[-1.0]),
        ],
        generate_s: 0.0,
        reference_s: 0.0,
        reward_s: 0.0,
    };
    assert_all_close(&rollout.kls(), &[0.75, -0.5], 1e-7);
    let beta = 0.2;
    let r = rollout.shaped_rewards(beta);
    assert_all_close(&r, &[1.0 - 0.2 * 0.75, 0.5 + 0.2 * 0.5], 1e-7); // [0.85, 0.6]
    assert_all_close(&rloo::advantages(&r, 2), &[0.25, -0.25], 1e-6);
    assert!(close(shaped_reward(1.0, 0.75, 0.2), 0.85, 1e-12));
    assert!(close(
        sequence_kl(&[-1.0, -0.5], &[-2.0, -0.25]),
        0.75,
        1e-12
    ));
}

/// -mean_i(A_i * sum_t logp): value and gradient by hand.
#[test]
fn sequence_loss_by_hand() {
    let logp =
        Var::from_tensor(&Tensor::new(&[[-1.0f32, -2.0, 0.0], [-0.5, -0.5, -0.5]], &CPU).unwrap())
            .unwrap();
    let adv = [0.5, -1.0];
    let loss = rlhf_rl::objectives::sequence_loss(logp.as_tensor(), &adv).unwrap();
    // sums: -3, -1.5 -> -(0.5 * -3 + -1 * -1.5) / 2 = -(-1.5 + 1.5) / 2 = 0
    let v = loss.to_scalar::<f32>().unwrap() as f64;
    assert!(v.abs() < 1e-7, "{v}");
    // d loss / d logp_it = -A_i / b.
    let g = loss.backward().unwrap();
    let g = g.get(logp.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(g, vec![vec![-0.25f32; 3], vec![0.5f32; 3]]);
    let loss2 = rlhf_rl::objectives::sequence_loss(logp.as_tensor(), &[1.0, 1.0]).unwrap();
    assert!(close(loss2.to_scalar::<f32>().unwrap() as f64, 2.25, 1e-6));
}

/// REINFORCE: the baseline is the mean of every reward seen *before* the batch, updated after it.
#[test]
fn reinforce_moving_average_updates_after_the_step() {
    let mut b = reinforce::MovingAverage::default();
    let batch1 = [1.0, 3.0];
    // Before any reward: b = 0, so the first batch's advantages are the rewards themselves.
    assert_all_close(&reinforce::advantages(&batch1, b.mean()), &[1.0, 3.0], 0.0);
    b.update(&batch1);
    assert_eq!(b.mean(), 2.0);
    let batch2 = [0.0, 6.0, 3.0];
    // The second batch is baselined by the first batch's mean only.
    assert_all_close(
        &reinforce::advantages(&batch2, b.mean()),
        &[-2.0, 4.0, 1.0],
        0.0,
    );
    b.update(&batch2);
    // Mean of all five rewards seen: 13 / 5.
    assert!(close(b.mean(), 2.6, 1e-12));
}

/// GRPO divides by the group's std (k - 1 in the denominator, as torch.std).
#[test]
fn grpo_advantages_divide_by_the_group_std() {
    let r = [1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0];
    let a = grpo::advantages(&r, 4, 1e-4);
    let std = (14.0f64 / 3.0).sqrt(); // deviations from 3: 4 + 1 + 0 + 9 = 14
    let want: Vec<f64> = [1.0, 2.0, 3.0, 6.0]
        .iter()
        .map(|x| (x - 3.0) / (std + 1e-4))
        .chain([0.0; 4])
        .collect();
    assert_all_close(&a, &want, 1e-12);
    // Unlike RLOO, scaling the rewards does not scale the advantages.
    let a10 = grpo::advantages(&r.map(|x| 10.0 * x), 4, 0.0);
    assert!(close(a10[3], 3.0 / std, 1e-12));
}

/// The clipped-ratio objective plus the k3 penalty, token mean per sequence, mean over sequences.
#[test]
fn grpo_loss_by_hand() {
    let d = CPU;
    // Two sequences; the second has one real token (mask 0 on the second position).
    let logp = Tensor::new(&[[-1.0f32, -2.0], [-0.5, 0.0]], &d).unwrap();
    let old = Tensor::new(&[[-1.5f32, -2.0], [-0.2, 0.0]], &d).unwrap();
    let refp = Tensor::new(&[[-1.0f32, -1.0], [-1.0, 0.0]], &d).unwrap();
    let mask = Tensor::new(&[[1.0f32, 1.0], [1.0, 0.0]], &d).unwrap();
    let (adv, eps, beta) = ([2.0, -1.0], 0.2, 0.1);
    let out = grpo::loss(&logp, &old, &refp, &mask, &adv, eps, beta).unwrap();
    let term = |lp: f64, o: f64, r: f64, a: f64| {
        let ratio = (lp - o).exp();
        let clipped = ratio.clamp(1.0 - eps, 1.0 + eps);
        -(ratio * a).min(clipped * a) + beta * k3(lp, r)
    };
    // Sequence 1: ratio e^0.5 = 1.6487 (clipped to 1.2 for A > 0), then ratio 1.
    let s1 = (term(-1.0, -1.5, -1.0, 2.0) + term(-2.0, -2.0, -1.0, 2.0)) / 2.0;
    // Sequence 2: ratio e^-0.3 = 0.7408 (A < 0: min picks the clipped 0.8 * -1 = -0.8).
    let s2 = term(-0.5, -0.2, -1.0, -1.0);
    let want = (s1 + s2) / 2.0;
    let got = out.loss.to_scalar::<f32>().unwrap() as f64;
    assert!(close(got, want, 1e-5), "{got} vs {want}");
    // By hand: s1 = (-2.4 + 0 - 2 + 0.1 * (e^1 - 2)) / 2, s2 = 0.8 + 0.1 * (e^-0.5 - 0.5)
    let by_hand = ((-2.4 - 2.0 + 0.1 * (1f64.exp() - 2.0)) / 2.0
        + (0.8 + 0.1 * ((-0.5f64).exp() - 0.5)))
        / 2.0;
    assert!(close(got, by_hand, 1e-5), "{got} vs {by_hand}");
    // Two of the three real tokens have their ratio outside [0.8, 1.2].
    assert!(close(out.clip_fraction, 2.0 / 3.0, 1e-6));
    assert!(close(k3(-1.0, -1.0), 0.0, 1e-12) && k3(-1.0, -3.0) > 0.0 && k3(-3.0, -1.0) > 0.0);
    let kt = k3_tensor(&logp, &refp).unwrap().to_vec2::<f32>().unwrap();
    assert!(close(kt[0][1] as f64, k3(-2.0, -1.0), 1e-6));
}

/// Vanilla PG: per-token KL rewards plus the score at the last token, returns-to-go (lambda = 1),
/// minus the value baseline; the token-level loss and the value loss.
#[test]
fn vanilla_pg_returns_and_losses_by_hand() {
    let r = rlhf_rl::objectives::token_rewards(2.0, &[-1.0, -0.5, -2.0], &[-1.5, -0.5, -1.0], 0.1);
    // -0.1 * [0.5, 0, -1] + [0, 0, 2]
    assert_all_close(&r, &[-0.05, 0.0, 2.1], 1e-7);
    let g = vanilla_pg::returns_to_go(&r);
    assert_all_close(&g, &[2.05, 2.1, 2.1], 1e-7);
    let a = vanilla_pg::advantages(&g, &[1.0, 2.5, 0.1]);
    assert_all_close(&a, &[1.05, -0.4, 2.0], 1e-6);

    let d = CPU;
    let logp =
        Var::from_tensor(&Tensor::new(&[[-1.0f32, -0.5, -2.0], [-1.0, 0.0, 0.0]], &d).unwrap())
            .unwrap();
    let adv = Tensor::new(&[[1.05f32, -0.4, 2.0], [3.0, 0.0, 0.0]], &d).unwrap();
    let loss = vanilla_pg::token_loss(logp.as_tensor(), &adv).unwrap();
    // -(1.05 * -1 + -0.4 * -0.5 + 2 * -2 + 3 * -1) / 2 = -(-1.05 + 0.2 - 4 - 3) / 2 = 3.925
    assert!(close(loss.to_scalar::<f32>().unwrap() as f64, 3.925, 1e-6));
    let grad = loss.backward().unwrap();
    let grad = grad
        .get(logp.as_tensor())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert!(close(grad[0][0] as f64, -0.525, 1e-6) && close(grad[1][0] as f64, -1.5, 1e-6));

    let values = Tensor::new(&[[1.0f32, 2.5, 0.1], [0.0, 0.0, 0.0]], &d).unwrap();
    let returns = Tensor::new(&[[2.05f32, 2.1, 2.1], [1.0, 9.0, 9.0]], &d).unwrap();
    let mask = Tensor::new(&[[1.0f32, 1.0, 1.0], [1.0, 0.0, 0.0]], &d).unwrap();
    let vl = vanilla_pg::value_loss(&values, &returns, &mask, 4.0).unwrap();
    // (1.05^2 + 0.4^2 + 2^2 + 1^2) / 2 / 4
    let want = (1.05f64.powi(2) + 0.16 + 4.0 + 1.0) / 8.0;
    assert!(close(vl.to_scalar::<f32>().unwrap() as f64, want, 1e-6));
}

/// RAFT keeps the best sample of each group (the first on ties).
#[test]
fn raft_keeps_the_best_of_each_group() {
    let r = [0.1, 0.9, 0.3, -1.0, -2.0, -0.5, 0.0, 0.0];
    assert_eq!(raft::best_of_groups(&r, 4), vec![1, 6]);
    assert_eq!(raft::best_of_groups(&r, 2), vec![1, 2, 5, 6]);
}

/// Ziegler's controller: beta grows when KL is above target, shrinks below, error clipped at 20%.
#[test]
fn adaptive_kl_controller() {
    let cfg = KlConfig {
        beta: 0.1,
        target: Some(2.0),
        horizon: 1000.0,
    };
    let mut c = KlController::new(&cfg);
    c.update(3.0, 100); // error 0.5 -> clipped 0.2: beta *= 1 + 0.2 * 0.1
    assert!(close(c.beta, 0.1 * 1.02, 1e-12));
    c.update(1.5, 100); // error -0.25 -> -0.2
    assert!(close(c.beta, 0.1 * 1.02 * 0.98, 1e-12));
    c.update(2.2, 1000); // error 0.1
    assert!(close(c.beta, 0.1 * 1.02 * 0.98 * 1.1, 1e-12));
    let mut fixed = KlController::new(&KlConfig::default());
    fixed.update(100.0, 100);
    assert_eq!(fixed.beta, KlConfig::default().beta);
}

#[test]
fn minibatches_hold_whole_groups() {
    let mb = split_groups(&[2, 0, 1], 2, 2);
    assert_eq!(mb, vec![vec![4, 5, 0, 1], vec![2, 3]]);
    assert_eq!(
        split_groups(&[0, 1], 3, 5),
        vec![vec![0, 1, 2], vec![3, 4, 5]]
    );
}

// ---- rollout engine ------------------------------------------------------------------------------

struct Constant(f64);
impl RewardSource for Constant {
    fn describe(&self) -> String {
        "constant".into()
    }
    fn score(&self, q: &[Query]) -> rlhf_train::Result<Vec<f64>> {
        Ok(vec![self.0; q.len()])
    }
}

#[test]
fn rollout_groups_masks_penalty_and_reference_logprobs() {
    let d = CPU;
    let task = task_by_name("sentiment", 0).unwrap();
    let lm = fresh_tiny(tokenizer_for(task.as_ref()), 1, &d).unwrap();
    let policy = lm.model(&d).unwrap().detached();
    let reference = lm.model(&d).unwrap().detached();
    let prompts: Vec<(String, Vec<u32>)> = task.train_prompts()[..3]
        .iter()
        .map(|p| (p.clone(), lm.encode_prompt(p, 64).unwrap()))
        .collect();
    let cfg = RolloutConfig {
        k: 2,
        max_new_tokens: 3,
        missing_eos_penalty: Some(0.75),
        batch_size: 4,
        ..RolloutConfig::default()
    };
    let rewarder = Rewarder {
        source: Box::new(Constant(1.0)),
        norm: None,
        batch_size: 5,
    };
    let models = Policies {
        policy: &policy,
        reference: &reference,
        tokenizer: &lm.tokenizer,
        pad_id: lm.pad_id,
        eos_ids: &lm.eos_ids,
    };
    let r = collect(&models, &prompts, &cfg, &rewarder, 7).unwrap();
    assert_eq!((r.len(), r.k, r.num_groups()), (6, 2, 3));
    let mut unfinished = 0;
    for (i, s) in r.samples.iter().enumerate() {
        assert_eq!(
            s.prompt,
            prompts[i / 2].0,
            "sample {i} belongs to prompt {}",
            i / 2
        );
        assert!(s.len() >= 1 && s.len() <= 3);
        assert_eq!(s.finished, s.completion_ids.last() == Some(&lm.eos_ids[0]));
        let want = if s.finished { 1.0 } else { 0.25 };
        unfinished += usize::from(!s.finished);
        assert_eq!((s.raw_score, s.score), (1.0, want));
        // Policy == reference: sampled log-probs equal the reference's scored ones.
        assert!(s.kl().abs() < 1e-4, "kl {}", s.kl());
    }
    assert!(
        unfinished > 0,
        "an untrained model rarely says EOS within 3 tokens"
    );
    // Same seed, same rollout.
    let again = collect(&models, &prompts, &cfg, &rewarder, 7).unwrap();
    assert_eq!(again.samples, r.samples);
    // align() puts per-token values where completion_logprobs puts the completion's log-probs.
    let idx = [1, 4];
    let batch = r.batch(&idx, lm.pad_id, &d).unwrap();
    let rows: Vec<&[f32]> = idx
        .iter()
        .map(|&i| r.samples[i].logprobs.as_slice())
        .collect();
    let aligned = align(&batch, &rows, &d).unwrap();
    let scored = rlhf_lm::score::completion_logprobs(&policy, &batch, 1.0).unwrap();
    let diff = (aligned - scored)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
}

// ---- reward sources ------------------------------------------------------------------------------

fn queries<'a>(texts: &'a [(&'a str, &'a str)]) -> Vec<Query<'a>> {
    texts
        .iter()
        .map(|(p, c)| Query {
            prompt: p,
            completion: c,
            prompt_ids: &[],
            completion_ids: &[],
        })
        .collect()
}

#[test]
fn score_responses_are_checked() {
    assert_eq!(
        parse_scores(r#"{"scores": [1, -2.5]}"#, 2).unwrap(),
        vec![1.0, -2.5]
    );
    assert_eq!(parse_scores("[0.5]", 1).unwrap(), vec![0.5]);
    let e = parse_scores("<html>busy</html>", 2).unwrap_err();
    assert!(e.contains("not JSON") && e.contains("busy"), "{e}");
    let e = parse_scores(r#"{"scores": [1]}"#, 2).unwrap_err();
    assert!(e.contains("1 scores for 2 completions"), "{e}");
    let e = parse_scores(r#"{"scores": [1, "x"]}"#, 2).unwrap_err();
    assert!(e.contains("score 1 is not a finite number"), "{e}");
    let e = parse_scores(r#"{"score": 1}"#, 1).unwrap_err();
    assert!(e.contains("expected"), "{e}");
}

fn sh(script: &str, timeout: f64, retries: usize) -> CommandSource {
    CommandSource {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        timeout: Duration::from_secs_f64(timeout),
        retries,
        retry_backoff_s: 0.01,
    }
}

#[test]
fn command_reward_source() {
    let q = [
        ("review : it was", "good ."),
        ("review : the plot", "dull ."),
    ];
    let q = queries(&q);
    // The request arrives on stdin as JSON.
    let echo = sh(
        r#"grep -q '"completions":\["good .","dull ."\]' && echo '{"scores": [1.5, -1]}'"#,
        10.0,
        0,
    );
    assert_eq!(echo.score(&q).unwrap(), vec![1.5, -1.0]);
    let junk = sh("cat > /dev/null; echo oops", 10.0, 0)
        .score(&q)
        .unwrap_err()
        .to_string();
    assert!(
        junk.contains("reward command") && junk.contains("not JSON") && junk.contains("oops"),
        "{junk}"
    );
    let failed = sh("echo broken >&2; exit 3", 10.0, 1)
        .score(&q)
        .unwrap_err()
        .to_string();
    assert!(
        failed.contains("exit") && failed.contains("broken") && failed.contains("2 attempts"),
        "{failed}"
    );
    let started = Instant::now();
    let slow = sh("sleep 5; echo '[1, 2]'", 0.3, 0)
        .score(&q)
        .unwrap_err()
        .to_string();
    assert!(slow.contains("timed out"), "{slow}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the slow command was killed"
    );
    // What the command started is stopped with it: a background `sleep` of the timed-out shell
    // is gone too (a zombie at most, until init reaps it).
    let pid_file = std::env::temp_dir().join(format!("rlhf-reward-child-{}", std::process::id()));
    let hung = sh(&format!("sleep 30 & echo $! > {pid_file:?}; wait"), 0.5, 0);
    assert!(hung.score(&q).is_err());
    let pid = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .to_string();
    std::thread::sleep(Duration::from_millis(200));
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let alive = state
        .rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().next())
        .is_some_and(|st| st != "Z" && st != "X");
    assert!(!alive, "the command's child survived the timeout: {state}");
    std::fs::remove_file(pid_file).ok();
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Reply {
    /// Score each completion by its number of words.
    Ok,
    Junk,
    Status500,
    /// Answer after this long (longer than the client's timeout).
    Slow(Duration),
}

/// A one-request-per-connection HTTP server on 127.0.0.1 answering `plan(request_number)`; it
/// serves at most `max_requests` requests and stops by itself after `lifetime`.
fn serve(
    plan: impl Fn(usize) -> Reply + Send + 'static,
    max_requests: usize,
    lifetime: Duration,
) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}/score", listener.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    std::thread::spawn(move || {
        let deadline = Instant::now() + lifetime;
        let mut served = 0;
        while served < max_requests && Instant::now() < deadline {
            let mut stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
            };
            stream.set_nonblocking(false).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let Some(body) = read_request(&mut stream) else {
                continue;
            };
            let n = counter.fetch_add(1, Ordering::SeqCst);
            served += 1;
            let (status, text) = match plan(n) {
                Reply::Ok => {
                    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                    let scores: Vec<f64> = v["completions"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|c| c.as_str().unwrap().split_whitespace().count() as f64)
                        .collect();
                    (200, serde_json::json!({ "scores": scores }).to_string())
                }
                Reply::Junk => (200, "<html>upstream busy</html>".to_string()),
                Reply::Status500 => (500, "internal error".to_string()),
                Reply::Slow(d) => {
                    std::thread::sleep(d);
                    (200, "[]".to_string())
                }
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                text.len()
            );
        }
    });
    (url, hits)
}

fn read_request(stream: &mut std::net::TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = stream.read(&mut chunk).ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Some(String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned());
        }
    }
}

#[test]
fn http_reward_source_scores_retries_and_fails_clearly() {
    let q = [
        ("review : it was", "really good ."),
        ("review : the plot", "dull ."),
    ];
    let q = queries(&q);
    let life = Duration::from_secs(30);
    // Answers.
    let (url, _) = serve(|_| Reply::Ok, 4, life);
    let ok = HttpSource::new("reward.url", &url, Duration::from_secs(10), 0, 0.01).unwrap();
    assert_eq!(ok.score(&q).unwrap(), vec![3.0, 2.0]);
    // Junk once, then answers: one retry is enough.
    let (url, hits) = serve(|n| if n == 0 { Reply::Junk } else { Reply::Ok }, 4, life);
    let retrying = HttpSource::new("reward.url", &url, Duration::from_secs(10), 1, 0.01).unwrap();
    assert_eq!(retrying.score(&q).unwrap(), vec![3.0, 2.0]);
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    // Junk every time: a clear error after 1 + retries attempts.
    let (url, hits) = serve(|_| Reply::Junk, 4, life);
    let e = HttpSource::new("reward.url", &url, Duration::from_secs(10), 2, 0.01)
        .unwrap()
        .score(&q)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&url)
            && e.contains("not JSON")
            && e.contains("upstream busy")
            && e.contains("3 attempts"),
        "{e}"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    // An error status.
    let (url, _) = serve(|_| Reply::Status500, 2, life);
    let e = HttpSource::new("reward.url", &url, Duration::from_secs(10), 0, 0.01)
        .unwrap()
        .score(&q)
        .unwrap_err()
        .to_string();
    assert!(e.contains("500"), "{e}");
    // Times out.
    let (url, hits) = serve(|_| Reply::Slow(Duration::from_millis(1500)), 2, life);
    let started = Instant::now();
    let e = HttpSource::new("reward.url", &url, Duration::from_millis(300), 1, 0.01)
        .unwrap()
        .score(&q)
        .unwrap_err()
        .to_string();
    assert!(e.contains("timed out") && e.contains("2 attempts"), "{e}");
    assert!(
        started.elapsed() < Duration::from_millis(1400),
        "{:?}",
        started.elapsed()
    );
    assert!(hits.load(Ordering::SeqCst) >= 1);
    // Nothing listening.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/score", l.local_addr().unwrap())
    };
    let e = HttpSource::new("reward.url", &closed, Duration::from_secs(2), 0, 0.01)
        .unwrap()
        .score(&q)
        .unwrap_err()
        .to_string();
    assert!(e.contains("request failed"), "{e}");
    assert!(HttpSource::new("reward.url", "ftp://x", Duration::from_secs(1), 0, 0.0).is_err());
}

// ---- short runs on the tiny model ----------------------------------------------------------------

fn tiny_config<M: rlhf_rl::online::Method>(model: &Path, out: &Path, k: usize) -> OnlineConfig<M> {
    let mut c = OnlineConfig::<M>::default();
    c.model = model.to_path_buf();
    c.task = Some("sentiment".into());
    c.output_dir = out.to_path_buf();
    c.steps = 4;
    c.prompts_per_step = 4;
    c.rollout.k = k;
    c.rollout.max_new_tokens = 6;
    c.reward.source = SourceKind::Gold;
    c.reward.normalize_samples = 16;
    c.save_every = 1;
    c.optim.lr = 1e-3;
    c.optim.warmup_ratio = 0.0;
    c.eval.prompts = 6;
    c
}

/// A run stopped after two iterations and resumed ends exactly like an uninterrupted one
/// (REINFORCE: its baseline is checkpoint state; vanilla PG: so is its value model).
#[test]
fn stopped_and_resumed_runs_match_uninterrupted_ones() {
    let root = scratch("resume");
    let model = tiny_model(&root, 2);

    let full: reinforce::ReinforceConfig = tiny_config(&model, &root.join("rf-full"), 2);
    reinforce::run(&full, false, &CPU).unwrap();
    let mut short = full.clone();
    short.output_dir = root.join("rf-resumed");
    short.steps = 2;
    reinforce::run(&short, false, &CPU).unwrap();
    let mut rest = short.clone();
    rest.steps = 4;
    reinforce::run(&rest, true, &CPU).unwrap();
    let (a, b) = (
        metrics(&root.join("rf-full/metrics.jsonl")),
        metrics(&root.join("rf-resumed/metrics.jsonl")),
    );
    assert_eq!(a, b);
    // The baseline logged at iteration 2 is the mean of iteration 1's shaped rewards only.
    let it = |m: &[serde_json::Value], i: f64, key: &str| {
        m.iter()
            .find(|v| v["iteration"].as_f64() == Some(i))
            .and_then(|v| v[key].as_f64())
            .unwrap()
    };
    assert_eq!(it(&a, 1.0, "baseline"), 0.0);
    assert!(close(
        it(&a, 2.0, "baseline"),
        it(&a, 1.0, "shaped_reward"),
        1e-9
    ));
    assert!(
        std::fs::read(root.join("rf-full/model/model.safetensors")).unwrap()
            == std::fs::read(root.join("rf-resumed/model/model.safetensors")).unwrap()
    );
    assert!(root.join("rf-full/eval.json").is_file());

    let full: vanilla_pg::VanillaPgConfig = tiny_config(&model, &root.join("vpg-full"), 1);
    vanilla_pg::run(&full, false, &CPU).unwrap();
    let mut short = full.clone();
    short.output_dir = root.join("vpg-resumed");
    short.steps = 2;
    vanilla_pg::run(&short, false, &CPU).unwrap();
    let mut rest = short.clone();
    rest.steps = 4;
    vanilla_pg::run(&rest, true, &CPU).unwrap();
    assert_eq!(
        metrics(&root.join("vpg-full/metrics.jsonl")),
        metrics(&root.join("vpg-resumed/metrics.jsonl"))
    );
}

/// Every method runs end to end on the tiny model and writes the same run directory layout.
#[test]
fn every_method_writes_the_run_layout() {
    let root = scratch("layout");
    let model = tiny_model(&root, 2);
    let check = |dir: &Path| {
        for f in [
            "config.toml",
            "metrics.jsonl",
            "eval.json",
            "model/model.safetensors",
            "checkpoints/latest",
        ] {
            assert!(dir.join(f).exists(), "{}: no {f}", dir.display());
        }
        let m = metrics(&dir.join("metrics.jsonl"));
        let last = m.iter().rev().find(|v| v.get("reward").is_some()).unwrap();
        for key in [
            "reward",
            "kl",
            "entropy",
            "response_length",
            "gold",
            "loss",
            "grad_norm",
        ] {
            assert!(
                last[key].as_f64().is_some_and(f64::is_finite),
                "{}: {key} in {last}",
                dir.display()
            );
        }
        let eval: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("eval.json")).unwrap()).unwrap();
        assert_eq!(eval["judge"], "gold");
        assert!(eval["kl_to_ref"].as_f64().is_some());
    };
    let mut c: rloo::RlooConfig = tiny_config(&model, &root.join("rloo"), 2);
    c.steps = 2;
    c.eval.every = 1;
    rloo::run(&c, false, &CPU).unwrap();
    check(&root.join("rloo"));
    // Periodic evaluations carry the iteration they follow (the comparison curves' x axis): one
    // after iteration 1, and the final one (eval.json's) after iteration 2.
    let evals: Vec<serde_json::Value> = metrics(&root.join("rloo/metrics.jsonl"))
        .into_iter()
        .filter(|v| v.get("eval/winrate").is_some())
        .collect();
    let its: Vec<f64> = evals
        .iter()
        .map(|v| v["eval/iteration"].as_f64().unwrap())
        .collect();
    assert_eq!(its, [1.0, 2.0]);
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("rloo/eval.json")).unwrap())
            .unwrap();
    assert_eq!(evals[1]["eval/winrate"], eval["winrate"]);
    let mut c: raft::RaftConfig = tiny_config(&model, &root.join("raft"), 2);
    c.steps = 2;
    raft::run(&c, false, &CPU).unwrap();
    check(&root.join("raft"));
    let mut c: grpo::GrpoConfig = tiny_config(&model, &root.join("grpo"), 2);
    c.steps = 2;
    grpo::run(&c, false, &CPU).unwrap();
    check(&root.join("grpo"));
    let m = metrics(&root.join("grpo/metrics.jsonl"));
    assert!(m.iter().any(|v| v["clip_fraction"].as_f64().is_some()));
}

/// Invalid combinations are refused before anything runs.
#[test]
fn invalid_configurations_are_refused() {
    let root = scratch("invalid");
    let model = tiny_model(&root, 2);
    let c: rloo::RlooConfig = tiny_config(&model, &root.join("a"), 1);
    let e = rloo::run(&c, false, &CPU).unwrap_err().to_string();
    assert!(e.contains("rollout.k >= 2"), "{e}");
    let c: grpo::GrpoConfig = tiny_config(&model, &root.join("b"), 1);
    assert!(grpo::run(&c, false, &CPU)
        .unwrap_err()
        .to_string()
        .contains("k must be >= 2"));
    let mut c: rloo::RlooConfig = tiny_config(&model, &root.join("c"), 2);
    c.reward.source = SourceKind::Model;
    let e = rloo::run(&c, false, &CPU).unwrap_err().to_string();
    assert!(e.contains("reward.model"), "{e}");
    let mut c: rloo::RlooConfig = tiny_config(&model, &root.join("d"), 2);
    c.reward.source = SourceKind::Http;
    c.reward.url = Some("https://example.invalid/score".into());
    if !cfg!(feature = "https") {
        let e = rloo::run(&c, false, &CPU).unwrap_err().to_string();
        assert!(e.contains("TLS"), "{e}");
    }
    assert!(!root.join("a/metrics.jsonl").exists());
}

/// A reward endpoint that starts returning junk stops the run with a clear error; the last
/// checkpoint stays intact and the run resumes from it once the endpoint is back.
#[test]
fn failing_reward_endpoint_stops_the_run_with_its_checkpoint_intact() {
    let root = scratch("endpoint");
    let model = tiny_model(&root, 2);
    // Good for two rollout batches (one request each), then junk.
    let (url, hits) = serve(
        |n| if n < 2 { Reply::Ok } else { Reply::Junk },
        8,
        Duration::from_secs(60),
    );
    let mut c: rloo::RlooConfig = tiny_config(&model, &root.join("run"), 2);
    c.reward.source = SourceKind::Http;
    c.reward.url = Some(url.clone());
    c.reward.normalize = false;
    c.reward.retries = 1;
    c.reward.retry_backoff_s = 0.01;
    c.reward.timeout_s = 10.0;
    let e = rloo::run(&c, false, &CPU).unwrap_err().to_string();
    assert!(
        e.contains(&url) && e.contains("not JSON") && e.contains("2 attempts"),
        "{e}"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 4);
    let run = RunDir::open_for_resume(root.join("run")).unwrap();
    let ck = run.latest_checkpoint().unwrap().expect("a checkpoint");
    assert_eq!(ck.step, 4, "two rollout batches of two optimiser steps");
    assert!(
        !root.join("run/model").exists(),
        "no final model from a failed run"
    );
    let weights = ck.load_model(&CPU).unwrap();
    assert!(weights.contains_key("model.embed_tokens.weight"));
    // The endpoint is back: resume from step 4 and finish.
    let (url2, _) = serve(|_| Reply::Ok, 8, Duration::from_secs(60));
    c.reward.url = Some(url2);
    let summary = rloo::run(&c, true, &CPU).unwrap();
    assert_eq!((summary.iterations, summary.optimizer_steps), (4, 8));
    // The eval (judged by gold: the task is set) ran and wrote eval.json.
    assert!(root.join("run/eval.json").is_file());
}

/// `gradient_checkpointing = true` in an online config: the first update's loss and gradient norm
/// equal the plain run's (same samples, same gradients to float rounding).
#[test]
fn online_gradient_checkpointing_matches_plain() {
    let root = scratch("online-ckpt");
    let model = tiny_model(&root, 2);
    let mut plain: reinforce::ReinforceConfig = tiny_config(&model, &root.join("plain"), 2);
    plain.steps = 1;
    reinforce::run(&plain, false, &CPU).unwrap();
    let mut ckpt = plain.clone();
    ckpt.output_dir = root.join("ckpt");
    ckpt.gradient_checkpointing = true;
    reinforce::run(&ckpt, false, &CPU).unwrap();
    let first = |dir: &str, key: &str| {
        metrics(&root.join(dir).join("metrics.jsonl"))
            .iter()
            .find_map(|v| v[key].as_f64())
            .unwrap_or_else(|| panic!("{dir}: no {key}"))
    };
    for key in ["loss", "grad_norm", "reward"] {
        let (a, b) = (first("plain", key), first("ckpt", key));
        assert!(close(a, b, 1e-4 * a.abs().max(1.0)), "{key}: {a} vs {b}");
    }
    assert!(first("ckpt", "grad_norm") > 0.0);
}
