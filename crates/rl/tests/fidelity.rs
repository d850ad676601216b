//! Fidelity of the shared pieces: one EOS per chat-formatted completion, preference pairs cut
//! under one shared prompt, the EFT judge bootstrap learning from annotator labels only, and the
//! evaluation KL at the sampling temperature.

mod common;
use common::{scratch, tiny_llama_fixture, CPU};
use std::sync::atomic::{AtomicUsize, Ordering};

use rlhf_data::testbed::{task_by_name, tokenizer_for, Task};
use rlhf_lm::batch::TokenBatch;
use rlhf_lm::generate::SamplingParams;
use rlhf_lm::llama::Llama;
use rlhf_rl::eval::{judge, run_eval, EvalConfig, Judges, KlModels};
use rlhf_rl::pairs::{load_pair_ids, load_rows};
use rlhf_rl::policy::{fresh_tiny, truncate_shared, TrainableLm};
use rlhf_rl::reward::last_token_index;
use rlhf_rl::sampling::{sample, Generated};

// ---- 2: one EOS, and the reward model reads at it ---------------------------------------------

/// The tiny Llama's chat template ends every turn with ` </s>\n`, so a rendered reply already
/// ends with EOS. SFT rows, RM/DPO pairs: the completion is cut right after its first EOS and
/// gets no second one, and the reward model's score is read at that EOS, where a rollout that
/// ends at EOS is read.
#[test]
fn chat_completion_ends_at_its_first_eos() {
    let dir = scratch("eos");
    let lm = TrainableLm::load(&tiny_llama_fixture(), &CPU).unwrap();
    let eos = lm.eos_ids[0];
    let sft = dir.join("sft.jsonl");
    std::fs::write(
        &sft,
        r#"{"messages":[{"role":"user","content":"hello there"},{"role":"assistant","content":"hi friend"}]}
"#,
    )
    .unwrap();
    let pairs = dir.join("pairs.jsonl");
    std::fs::write(
        &pairs,
        r#"{"prompt":[{"role":"user","content":"hello there"}],"chosen":[{"role":"assistant","content":"hi friend"}],"rejected":[{"role":"assistant","content":"go away"}]}
"#,
    )
    .unwrap();
    // What the template renders, encoded as TRL does: the reply's ids hold EOS then more.
    let loaded = rlhf_data::loaders::load_prompt_completion(
        &sft,
        lm.chat_template.as_ref(),
        &Default::default(),
    )
    .unwrap();
    let raw = lm
        .tokenizer
        .encode(&loaded.items[0].completion, false)
        .unwrap();
    let first = raw
        .iter()
        .position(|&t| t == eos)
        .expect("rendered reply holds EOS");

    let rows = load_rows(&lm, &sft, 256, false).unwrap();
    let (p, c) = &rows[0];
    assert_eq!(
        c,
        &raw[..=first].to_vec(),
        "cut after the first EOS, nothing appended"
    );
    assert_eq!(c.iter().filter(|&&t| t == eos).count(), 1);

    let pair = &load_pair_ids(&lm, &pairs, 256, false).unwrap()[0];
    for side in [&pair.chosen, &pair.rejected] {
        assert_eq!(side.iter().filter(|&&t| t == eos).count(), 1, "{side:?}");
        assert_eq!(side.last(), Some(&eos));
    }
    assert_eq!(pair.chosen, *c);
    assert_eq!(pair.prompt, *p);

    // The reward model reads the row's score at its last real token: the EOS, the same place a
    // rollout that stopped at EOS (completion ids ending with it) is read.
    let full: Vec<Vec<u32>> = vec![
        [pair.prompt.as_slice(), pair.chosen.as_slice()].concat(),
        [pair.prompt.as_slice(), pair.rejected.as_slice()].concat(),
    ];
    let batch = TokenBatch::right_padded(&full, lm.pad_id, &CPU).unwrap();
    let last = last_token_index(&batch, &CPU)
        .unwrap()
        .to_vec1::<u32>()
        .unwrap();
    for (row, &i) in full.iter().zip(&last) {
        assert_eq!(i as usize, row.len() - 1);
        assert_eq!(row[i as usize], eos);
    }

    // Tokens after the first EOS are dropped.
    let (_, c) = lm
        .encode("hello", " hi friend </s> hi friend </s>", true, 256)
        .unwrap();
    let plain = lm.tokenizer.encode(" hi friend </s>", false).unwrap();
    assert_eq!(c, plain);
    assert!(
        lm.tokenizer
            .encode(" hi friend </s> hi friend </s>", false)
            .unwrap()
            .len()
            > plain.len()
    );
    // A plain-text completion without EOS gets exactly one appended.
    let (_, c) = lm.encode("hello", " hi", true, 256).unwrap();
    assert_eq!(c.last(), Some(&eos));
    assert_eq!(c.iter().filter(|&&t| t == eos).count(), 1);
}

// ---- 3: one shared prompt per pair ------------------------------------------------------------

/// Hand-made lengths: prompt 10, chosen 8 (EOS-ended), rejected 3 (EOS-ended), max_len 12. The
/// longer completion asks for more than half, so the prompt keeps 12 - 6 = 6 tokens (its end),
/// both completions are cut to the 6 left: chosen loses its EOS by the cut, so rejected's EOS is
/// dropped too. With completions 4 and 2 the prompt keeps 12 - 4 = 8 and nothing else is cut.
#[test]
fn pair_truncation_shares_one_prompt() {
    const EOS: u32 = 2;
    let prompt: Vec<u32> = (100..110).collect();
    let mut p = prompt.clone();
    let mut c = vec![20, 21, 22, 23, 24, 25, 26, EOS];
    let mut r = vec![30, 31, EOS];
    truncate_shared(&mut p, &mut c, &mut r, 12, &[EOS]);
    assert_eq!(p, (104..110).collect::<Vec<u32>>());
    assert_eq!(c, vec![20, 21, 22, 23, 24, 25]);
    assert_eq!(r, vec![30, 31]);

    let mut p = prompt.clone();
    let mut c = vec![20, 21, 22, EOS];
    let mut r = vec![30, EOS];
    truncate_shared(&mut p, &mut c, &mut r, 12, &[EOS]);
    assert_eq!(p, (102..110).collect::<Vec<u32>>());
    assert_eq!((c.len(), r.len()), (4, 2), "nothing cut: both keep EOS");

    // A pair that fits is untouched.
    let (mut p, mut c, mut r) = (vec![1, 2, 3], vec![4, EOS], vec![5, 6, EOS]);
    truncate_shared(&mut p, &mut c, &mut r, 6, &[EOS]);
    assert_eq!((p, c, r), (vec![1, 2, 3], vec![4, EOS], vec![5, 6, EOS]));
}

/// Through the loader, with a short chosen and a long rejected reply: one prompt for both sides,
/// each side within max_len, and EOS on neither side once the rejected is cut.
#[test]
fn loaded_pairs_fit_max_len_under_one_prompt() {
    let dir = scratch("trunc");
    let task = task_by_name("sentiment", 0).unwrap();
    let lm = fresh_tiny(tokenizer_for(task.as_ref()), 0, &CPU).unwrap();
    let eos = lm.eos_ids[0];
    let (prompt, response) = task.demonstrations()[0].clone();
    let words: Vec<&str> = response.split_whitespace().collect();
    let long = std::iter::repeat_n(words.clone(), 6)
        .flatten()
        .collect::<Vec<_>>()
        .join(" ");
    let short = words[0].to_string();
    let file = dir.join("pairs.jsonl");
    std::fs::write(
        &file,
        format!(
            "{}\n",
            serde_json::json!({"prompt": prompt, "chosen": format!(" {short}"), "rejected": format!(" {long}")})
        ),
    )
    .unwrap();
    let (full_p, full_c) = lm
        .encode(&prompt, &format!(" {short}"), true, 10_000)
        .unwrap();
    let (_, full_r) = lm
        .encode(&prompt, &format!(" {long}"), true, 10_000)
        .unwrap();
    let max_len = full_p.len() + full_c.len() + 2;
    assert!(
        full_p.len() + full_r.len() > max_len,
        "the rejected side must need cutting"
    );
    let pair = &load_pair_ids(&lm, &file, max_len, false).unwrap()[0];
    assert!(pair.prompt.len() + pair.chosen.len() <= max_len);
    assert!(
        pair.prompt.len() + pair.rejected.len() <= max_len,
        "prompt {} + rejected {} > {max_len}",
        pair.prompt.len(),
        pair.rejected.len()
    );
    // By hand: longest = rejected > max_len / 2, so the prompt keeps max_len - max_len / 2 of its
    // tail, and both sides get the rest; chosen (2 tokens, fits) loses its EOS because rejected
    // was cut.
    let keep = full_p.len().min(max_len - max_len / 2);
    assert_eq!(pair.prompt, full_p[full_p.len() - keep..].to_vec());
    assert_eq!(pair.rejected, full_r[..max_len - keep].to_vec());
    assert_eq!(pair.chosen, full_c[..full_c.len() - 1].to_vec());
    assert!(!pair.chosen.contains(&eos) && !pair.rejected.contains(&eos));
}

// ---- 1: the EFT judge never learns from gold --------------------------------------------------

/// A task whose gold reward must not be read: it counts calls and panics.
struct NoGold {
    inner: Box<dyn Task>,
    calls: AtomicUsize,
}

impl Task for NoGold {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn train_prompts(&self) -> &[String] {
        self.inner.train_prompts()
    }
    fn eval_prompts(&self) -> &[String] {
        self.inner.eval_prompts()
    }
    fn demonstrations(&self) -> &[(String, String)] {
        self.inner.demonstrations()
    }
    fn gold(&self, _prompt: &str, _response: &str) -> f64 {
        self.calls.fetch_add(1, Ordering::SeqCst);
        panic!("the EFT bootstrap read the gold reward");
    }
    fn max_response_words(&self) -> usize {
        self.inner.max_response_words()
    }
}

/// EFT judge data come from pairwise labels only. Here the "annotator" prefers the longer reply
/// (the shorter on equal length, so labels are not symmetric), the task's gold panics; every judge
/// example's score is the candidate's wins in its group of 6 (5 opponents -> 0-5), recomputed by
/// hand from the same rule.
#[test]
fn eft_bootstrap_learns_from_annotator_labels_not_gold() {
    use rlhf_rl::judge::{eft_bootstrap, EftConfig, JudgeConfig, JudgePrompt};
    let dir = scratch("eft");
    let inner = task_by_name("sentiment", 0).unwrap();
    let lm = fresh_tiny(tokenizer_for(inner.as_ref()), 3, &CPU).unwrap();
    lm.save(&dir.join("init")).unwrap();
    let task = NoGold {
        inner,
        calls: AtomicUsize::new(0),
    };
    let cfg = EftConfig {
        examples: 10, // rounded up to 2 groups of 6
        epochs: 1,
        batch_size: 8,
        with_demonstrations: false,
        ..EftConfig::default()
    };
    let jp = JudgePrompt::resolve(&JudgeConfig::default(), true, None).unwrap();
    let mut asked = 0usize;
    let mut prefer = |_p: &str, a: &str, b: &str| {
        asked += 1;
        let (la, lb) = (a.split_whitespace().count(), b.split_whitespace().count());
        la > lb || (la == lb && a < b)
    };
    let model = eft_bootstrap(
        &cfg,
        &jp,
        &task,
        &mut prefer,
        &dir.join("init"),
        &dir.join("eft"),
        7,
        &CPU,
    )
    .unwrap();
    assert!(model.join("config.json").exists());
    assert_eq!(task.calls.load(Ordering::SeqCst), 0, "gold was read");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("eft/eft.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 12);
    // Recover each candidate's reply from its judge prompt `{prompt} {response} . score :`.
    let mut distinct_pairs = 0;
    for (g, group) in lines.chunks(6).enumerate() {
        let prompt = task.train_prompts()[g].trim();
        let replies: Vec<String> = group
            .iter()
            .map(|l| {
                let text = l["prompt"].as_str().unwrap();
                let rest = text.strip_prefix(prompt).unwrap().trim_start();
                rest.strip_suffix(". score :")
                    .unwrap()
                    .trim_end()
                    .to_string()
            })
            .collect();
        for (i, l) in group.iter().enumerate() {
            let mut wins = 0.0;
            for j in 0..6 {
                if j == i {
                    continue;
                }
                let (a, b) = (&replies[i], &replies[j]);
                if a == b {
                    wins += 0.5;
                    continue;
                }
                let (la, lb) = (a.split_whitespace().count(), b.split_whitespace().count());
                if la > lb || (la == lb && a < b) {
                    wins += 1.0;
                }
                if j > i {
                    distinct_pairs += 1;
                }
            }
            let score: u8 = l["completion"].as_str().unwrap().trim().parse().unwrap();
            assert_eq!(
                score,
                (wins as f64).round() as u8,
                "group {g} candidate {i}: {replies:?}"
            );
        }
    }
    assert_eq!(
        asked, distinct_pairs,
        "one comparison per distinct pair in a group"
    );
    assert!(asked > 0);
}

/// `win_scores` by hand: a group of 3 where a beats b and c, b beats c: wins 2, 1, 0 -> 5, 2.5 ->
/// 3 (rounded half away from zero), 0; a group of 2 identical replies ties: 0.5 win each -> 3.
#[test]
fn win_scores_by_hand() {
    use rlhf_rl::judge::win_scores;
    let groups = vec![("p", vec!["a", "b", "c"]), ("q", vec!["x", "x"])];
    let order = |s: &str| match s {
        "a" => 3,
        "b" => 2,
        _ => 1,
    };
    let (scores, asked) = win_scores(&groups, &mut |_, a, b| order(a) > order(b));
    assert_eq!(scores, vec![5, 3, 0, 3, 3]);
    assert_eq!(asked, 3);
}

// ---- 8: evaluation temperature and the KL at it -----------------------------------------------

/// log softmax(logits / t)[target] for each completion token of (prompt, completion), by hand on
/// the host in f64.
fn scaled_logprobs(
    model: &Llama,
    pad: u32,
    prompt: &[u32],
    completion: &[u32],
    t: f64,
) -> Vec<f64> {
    let row = [prompt, completion].concat();
    let batch = TokenBatch::right_padded(&[row.clone()], pad, &CPU).unwrap();
    let hidden = model
        .hidden_states(&batch.ids, &batch.positions, &batch.mask, None)
        .unwrap();
    let logits = model.logits(&hidden).unwrap().to_vec3::<f32>().unwrap();
    (0..completion.len())
        .map(|k| {
            let i = prompt.len() - 1 + k;
            let z: Vec<f64> = logits[0][i].iter().map(|&x| x as f64 / t).collect();
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            z[row[i + 1] as usize] - lse
        })
        .collect()
}

fn hand_kl(pi: &Llama, reference: &Llama, pad: u32, samples: &[Generated], t: f64) -> f64 {
    let per: Vec<f64> = samples
        .iter()
        .map(|g| {
            let a = scaled_logprobs(pi, pad, &g.prompt_ids, &g.completion_ids, t);
            let b = scaled_logprobs(reference, pad, &g.prompt_ids, &g.completion_ids, t);
            a.iter().zip(&b).map(|(x, y)| x - y).sum::<f64>()
        })
        .collect();
    per.iter().sum::<f64>() / per.len() as f64
}

/// `rlhf eval` at temperature 0.7 samples both policies at 0.7 and reports the k1 estimate of
/// KL(pi_0.7 || ref_0.7): the mean summed log-ratio of the 0.7-scaled distributions over the
/// policy's samples, recomputed here by hand; at 1.0 the same with unscaled distributions.
#[test]
fn eval_kl_is_taken_at_the_sampling_temperature() {
    let dir = scratch("evalkl");
    let task = task_by_name("sentiment", 0).unwrap();
    let tok = tokenizer_for(task.as_ref());
    let pol = fresh_tiny(tok.clone(), 1, &CPU).unwrap();
    let refm = fresh_tiny(tok.clone(), 2, &CPU).unwrap();
    pol.save(&dir.join("policy")).unwrap();
    refm.save(&dir.join("reference")).unwrap();
    let pi = TrainableLm::load(&dir.join("policy"), &CPU).unwrap();
    let rf = TrainableLm::load(&dir.join("reference"), &CPU).unwrap();
    let (pi_m, rf_m) = (pi.model(&CPU).unwrap(), rf.model(&CPU).unwrap());
    let mut kls = Vec::new();
    for t in [0.7, 1.0] {
        let cfg = EvalConfig {
            policy: dir.join("policy"),
            reference: Some(dir.join("reference")),
            task: Some("sentiment".into()),
            max_prompts: 6,
            max_new_tokens: 5,
            temperature: t,
            seed: 4,
            output: dir.join(format!("eval-{t}.json")),
            ..EvalConfig::default()
        };
        let report = run_eval(&cfg, &CPU).unwrap();
        // The policy's samples, drawn as `run_eval` draws them.
        let prompts: Vec<(String, Vec<u32>)> = task.eval_prompts()[..6]
            .iter()
            .map(|p| (p.clone(), pi.tokenizer.encode(p, true).unwrap()))
            .collect();
        let params = SamplingParams {
            max_new_tokens: 5,
            temperature: t,
            seed: 4,
            eos_token_ids: pi.eos_ids.clone(),
            ..Default::default()
        };
        let samples = sample(&pi_m, &pi.tokenizer, pi.pad_id, &prompts, &params, 32).unwrap();
        let expected = hand_kl(&pi_m, &rf_m, pi.pad_id, &samples, t);
        let got = report.kl_to_ref.unwrap();
        assert!((got - expected).abs() < 1e-3, "T {t}: {got} vs {expected}");
        // `judge` with the KL models directly gives the same.
        let gold = |p: &str, r: &str| task.gold(p, r);
        let j = judge(
            &samples,
            &samples,
            &Judges {
                gold: Some(&gold),
                reward_model: None,
            },
            Some(KlModels {
                policy: &pi_m,
                reference: &rf_m,
                pad_id: pi.pad_id,
                temperature: t,
            }),
        )
        .unwrap();
        assert!((j.kl_to_ref.unwrap() - expected).abs() < 1e-3);
        // The unscaled (T = 1) estimate on the T-samples is a different number when T != 1.
        if t != 1.0 {
            let at_one = hand_kl(&pi_m, &rf_m, pi.pad_id, &samples, 1.0);
            assert!(
                (at_one - expected).abs() > 1e-2,
                "{at_one} vs {expected}: test cannot tell"
            );
        }
        kls.push(got);
    }
    assert!(kls.iter().all(|k| k.is_finite()));
}

// ---- DPO's first step does not depend on how the batch is split ------------------------------

/// At DPO's first step the policy is the reference, so with reference log-probs taken in the same
/// batches every pair's logit is exactly 0. -log sigmoid at exactly 0 once took one-sided
/// derivatives (the kinks of max(-x, 0) and |x| in the stable formula): -3/2 instead of -1/2, so
/// the first step was 3 times too large wherever the logits came out exactly 0, and changed with
/// the micro-batch split (`optim.grad_accum`) and the number of data-parallel ranks where they
/// came out 0 in some splits only. The gradient must be the closed form, for any split.
#[test]
fn dpo_first_step_gradient_is_the_closed_form_for_any_micro_batch_split() {
    use rlhf_rl::pairs::PairIds;
    use rlhf_rl::pref::{pair_batch_loss, PairLossParams};
    use rlhf_rl::pref_losses::PairLossKind;
    let task = task_by_name("sentiment", 0).unwrap();
    let lm = fresh_tiny(tokenizer_for(task.as_ref()), 7, &CPU).unwrap();
    let d = task.demonstrations();
    let ids = |s: &str| lm.tokenizer.encode(s, false).unwrap();
    let pairs: Vec<PairIds> = (0..8)
        .map(|i| PairIds {
            prompt: lm.encode_prompt(&d[i].0, 64).unwrap(),
            chosen: ids(&format!(" {}", d[i].1)),
            rejected: ids(&format!(" {}", d[i + 8].1)),
            margin: 0.0,
        })
        .collect();
    // The reference log-probs, scored exactly as the whole-batch step scores the policy (the
    // trainable model, all chosen rows then all rejected rows in one batch): its logits are 0.
    let rows: Vec<(Vec<u32>, Vec<u32>)> = pairs
        .iter()
        .map(|p| (p.prompt.clone(), p.chosen.clone()))
        .chain(pairs.iter().map(|p| (p.prompt.clone(), p.rejected.clone())))
        .collect();
    let batch = rlhf_lm::score::CompletionBatch::new(&rows, lm.pad_id, &CPU).unwrap();
    let sums: Vec<f32> = rlhf_lm::score::completion_logprobs(&lm.model(&CPU).unwrap(), &batch, 1.0)
        .unwrap()
        .sum(1)
        .unwrap()
        .to_vec1()
        .unwrap();
    let b = pairs.len();
    let refs: Vec<[f64; 2]> = (0..b)
        .map(|i| [sums[i] as f64, sums[b + i] as f64])
        .collect();
    let params = PairLossParams {
        kind: PairLossKind::Dpo,
        beta: 0.1,
        label_smoothing: 0.0,
        ipo_length_normalize: false,
        simpo_gamma: 0.0,
    };
    let vars: Vec<candle_core::Var> = lm.params.vars.iter().map(|(_, v)| v.clone()).collect();
    // Every parameter's gradient, in one vector.
    let flat = |g: &candle_core::backprop::GradStore| -> Vec<f32> {
        vars.iter()
            .flat_map(|v| {
                g.get(v.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect()
    };
    let gradient = |parts: usize| -> Vec<f32> {
        let mut acc = rlhf_train::GradAccumulator::new(&vars);
        let m = pairs.len() / parts;
        for i in 0..parts {
            let model = lm.model(&CPU).unwrap();
            let r = &refs[i * m..(i + 1) * m];
            let (out, metrics) = pair_batch_loss(
                &model,
                lm.pad_id,
                &pairs[i * m..(i + 1) * m],
                Some(r),
                &params,
                &CPU,
            )
            .unwrap();
            // Policy = reference: every margin is 0 (exactly, for the whole batch).
            let margin = metrics
                .iter()
                .find(|(k, _)| *k == "rewards/margins")
                .unwrap()
                .1;
            assert!(margin.abs() < 1e-4, "{margin}");
            if parts == 1 {
                assert_eq!(margin, 0.0);
            }
            let loss = (out.loss * (1.0 / parts as f64)).unwrap();
            acc.add(rlhf_lm::llama::backward(&loss).unwrap()).unwrap();
        }
        flat(&acc.finish())
    };
    let whole = gradient(1);
    let scale = whole.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
    assert!(scale > 1e-3, "no gradient at all");
    // By hand: at logit 0, d/dz -log sigmoid(z) = -1/2, so the loss's gradient is
    // -(beta / 2) * mean_i (grad log pi(chosen_i) - grad log pi(rejected_i)).
    let expected: Vec<f32> = {
        let lp = rlhf_lm::score::completion_logprobs(&lm.model(&CPU).unwrap(), &batch, 1.0)
            .unwrap()
            .sum(1)
            .unwrap();
        let diff = (lp.narrow(0, 0, b).unwrap() - lp.narrow(0, b, b).unwrap()).unwrap();
        let g = rlhf_lm::llama::backward(&(diff.mean_all().unwrap() * (-0.05)).unwrap()).unwrap();
        flat(&g)
    };
    let max_diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max)
    };
    let off = max_diff(&whole, &expected);
    assert!(
        off <= 1e-5 * scale,
        "first-step gradient off the closed form by {off} (scale {scale})"
    );
    for parts in [2, 4, 8] {
        let split = gradient(parts);
        let diff = max_diff(&whole, &split);
        assert!(
            diff <= 1e-5 * scale,
            "{parts} parts: gradients differ by {diff} (scale {scale})"
        );
    }
}
