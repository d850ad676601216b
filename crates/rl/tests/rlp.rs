//! RLP's shared pieces against hand-computed values: the closed-form symmetric KL, the JS
//! mutual-information estimator and its bilinear critic, the MIB loss's gradients by finite
//! differences, and SPG's clustering, confidence and pair selection on hand-made samples.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use rlhf_data::testbed::{normalised_text, task_by_name};
use rlhf_rl::mib::{self, js_mi, symmetric_kl, Critic, GaussianHeads, HeadShape};
use rlhf_rl::spg::{
    self, cluster, confidence, largest, reward_ranked, select, Entailment, EquivalenceConfig,
    EquivalenceKind, SampleGroup, Selection,
};

const CPU: Device = Device::Cpu;

fn t2(v: &[&[f64]]) -> Tensor {
    let rows = v.len();
    let cols = v[0].len();
    Tensor::from_vec(v.concat(), (rows, cols), &CPU).unwrap()
}

/// Row 1 (1-D pieces): p1 = N(0, 1), p2 = N(1, 2): KL(p1‖p2) = ½ ln 2, KL(p2‖p1) = ½(2 − ln 2),
/// so their mean is exactly 0.5; dimension 2: N(0, 4) vs N(0, 1): ¼[(4 + 0)/1 + (1 + 0)/4 − 2] =
/// 0.5625. Row 2: identical Gaussians, 0.
#[test]
fn symmetric_kl_of_diagonal_gaussians_by_hand() {
    let mu1 = t2(&[&[0.0, 0.0], &[0.3, -1.0]]);
    let lv1 = t2(&[&[0.0, 4f64.ln()], &[0.2, 0.7]]);
    let mu2 = t2(&[&[1.0, 0.0], &[0.3, -1.0]]);
    let lv2 = t2(&[&[2f64.ln(), 0.0], &[0.2, 0.7]]);
    let skl = symmetric_kl(&mu1, &lv1, &mu2, &lv2)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    assert!((skl[0] - 1.0625).abs() < 1e-12, "{skl:?}");
    assert!(skl[1].abs() < 1e-12, "{skl:?}");
    // The same from the definition KL = ½ Σ [ln(σ2²/σ1²) + (σ1² + Δ²)/σ2² − 1].
    let kl = |m1: f64, v1: f64, m2: f64, v2: f64| {
        0.5 * ((v2 / v1).ln() + (v1 + (m1 - m2).powi(2)) / v2 - 1.0)
    };
    let want = 0.5 * (kl(0.0, 1.0, 1.0, 2.0) + kl(1.0, 2.0, 0.0, 1.0))
        + 0.5 * (kl(0.0, 4.0, 0.0, 1.0) + kl(0.0, 1.0, 0.0, 4.0));
    assert!((skl[0] - want).abs() < 1e-12, "{} vs {want}", skl[0]);
    // Symmetric in its two arguments.
    let back = symmetric_kl(&mu2, &lv2, &mu1, &lv1)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    assert!((back[0] - skl[0]).abs() < 1e-12);
}

/// T = [[1, −1], [0, 2]]: positives T11 = 1, T22 = 2, negatives T12 = −1, T21 = 0.
/// Î = −½[softplus(−1) + softplus(−2)] − ½[softplus(−1) + softplus(0)]
///   = −½(0.3132616875 + 0.1269280110) − ½(0.3132616875 + 0.6931471806) = −0.7232992833.
#[test]
fn js_estimator_by_hand() {
    let t = t2(&[&[1.0, -1.0], &[0.0, 2.0]]);
    let i = js_mi(&t).unwrap().to_scalar::<f64>().unwrap();
    assert!((i - (-0.723_299_283_3)).abs() < 1e-9, "{i}");
    // One pair: no negatives, −softplus(−0.5) = −ln(1 + e^−0.5) = −0.4740769842.
    let one = js_mi(&t2(&[&[0.5]])).unwrap().to_scalar::<f64>().unwrap();
    assert!((one - (-0.474_076_984_2)).abs() < 1e-9, "{one}");
    // Not square: an error, not a panic.
    assert!(js_mi(&t2(&[&[0.5, 1.0]])).is_err());
}

fn f64_heads(shape: HeadShape, seed: u64) -> HashMap<String, Tensor> {
    let mut w = HashMap::new();
    mib::add_heads(&mut w, shape, seed, &CPU).unwrap();
    w.into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F64).unwrap()))
        .collect()
}

/// The bilinear critic: T_ij = z1_iᵀ W z2_j, with W = I/√k at initialisation.
#[test]
fn bilinear_critic_by_hand() {
    let shape = HeadShape {
        input: 3,
        width: 4,
        z_dim: 2,
    };
    let mut w = f64_heads(shape, 1);
    let crit = w[mib::CRITIC].to_vec2::<f64>().unwrap();
    let s = 1.0 / 2f64.sqrt();
    for (i, row) in crit.iter().enumerate() {
        for (j, &x) in row.iter().enumerate() {
            let want = if i == j { s } else { 0.0 };
            assert!((x - want).abs() < 1e-7, "{crit:?}");
        }
    }
    w.insert(mib::CRITIC.into(), t2(&[&[1.0, 2.0], &[0.0, -1.0]]));
    let heads = GaussianHeads::from_weights(&w).unwrap();
    let z1 = t2(&[&[1.0, 1.0], &[2.0, 0.0]]);
    let z2 = t2(&[&[0.5, 1.0], &[-1.0, 3.0]]);
    // z1 W: [1, 1] -> [1, 1]; [2, 0] -> [2, 4]. Then dot with z2 rows:
    // [1,1]·[0.5,1] = 1.5, [1,1]·[−1,3] = 2, [2,4]·[0.5,1] = 5, [2,4]·[−1,3] = 10.
    let t = heads.scores(&z1, &z2).unwrap().to_vec2::<f64>().unwrap();
    assert_eq!(t, vec![vec![1.5, 2.0], vec![5.0, 10.0]]);
}

/// cos/τ by hand: z1 = [[3, 4]], z2 = [[4, 3], [0, -2]]: cosines 24/25 and −8/10, over τ = 0.5.
/// A constant code scores every pair 1/τ: Î_JS = −softplus(−2) − softplus(2) = −2.2538560, worse
/// than the −2 ln 2 a collapsed bilinear critic reaches.
#[test]
fn cosine_critic_by_hand() {
    let t = mib::cosine_scores(&t2(&[&[3.0, 4.0]]), &t2(&[&[4.0, 3.0], &[0.0, -2.0]]), 0.5)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    assert!(
        (t[0][0] - 1.92).abs() < 1e-9 && (t[0][1] + 1.6).abs() < 1e-9,
        "{t:?}"
    );
    let same = t2(&[&[1.0, 2.0], &[1.0, 2.0]]);
    let collapsed = js_mi(&mib::cosine_scores(&same, &same, 0.5).unwrap())
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!((collapsed - (-2.253_856_022)).abs() < 1e-6, "{collapsed}");
    assert!(mib::cosine_scores(&same, &same, 0.0).is_err());
}

/// Gradients of L_M = −Î_JS + mean D_SKL with respect to both views' hidden states, the critic
/// and an encoder weight match central finite differences (in f64).
#[test]
fn mib_loss_gradients_match_finite_differences() {
    check_mib_gradients(Critic::Bilinear);
}

/// The same with the cosine critic (W takes no part, so it gets no gradient).
#[test]
fn mib_loss_gradients_match_finite_differences_with_the_cosine_critic() {
    check_mib_gradients(Critic::Cosine { temperature: 0.5 });
}

fn check_mib_gradients(critic_kind: Critic) {
    let shape = HeadShape {
        input: 4,
        width: 3,
        z_dim: 2,
    };
    let b = 3;
    let base = f64_heads(shape, 7);
    let h1 = Var::from_tensor(
        &mib::gaussian_noise(b, 4, 11, &CPU)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap(),
    )
    .unwrap();
    let h2 = Var::from_tensor(
        &mib::gaussian_noise(b, 4, 12, &CPU)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap(),
    )
    .unwrap();
    let e1 = mib::gaussian_noise(b, 2, 13, &CPU)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let e2 = mib::gaussian_noise(b, 2, 14, &CPU)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let critic = Var::from_tensor(&base[mib::CRITIC]).unwrap();
    let w_mu = Var::from_tensor(&base["mib.mu.0.weight"]).unwrap();
    let w_lv = Var::from_tensor(&base["mib.logvar.2.weight"]).unwrap();
    let loss_at = |h1: &Tensor, h2: &Tensor, c: &Tensor, wm: &Tensor, wl: &Tensor| {
        let mut w = base.clone();
        w.insert(mib::CRITIC.into(), c.clone());
        w.insert("mib.mu.0.weight".into(), wm.clone());
        w.insert("mib.logvar.2.weight".into(), wl.clone());
        let heads = GaussianHeads::from_weights(&w).unwrap();
        mib::mib_loss(&heads, critic_kind, h1, h2, &e1, &e2).unwrap()
    };
    let out = loss_at(
        h1.as_tensor(),
        h2.as_tensor(),
        critic.as_tensor(),
        w_mu.as_tensor(),
        w_lv.as_tensor(),
    );
    let l0 = out.loss.to_scalar::<f64>().unwrap();
    assert!((l0 - (out.skl - out.mi)).abs() < 1e-12);
    let grads = out.loss.backward().unwrap();
    let eps = 1e-6;
    let mut checked = 0;
    for (which, var) in [(0, &h1), (1, &h2), (2, &critic), (3, &w_mu), (4, &w_lv)] {
        if which == 2 && critic_kind != Critic::Bilinear {
            assert!(grads.get(var.as_tensor()).is_none());
            checked += 4;
            continue;
        }
        let g = grads
            .get(var.as_tensor())
            .expect("a gradient")
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let x = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let dims = var.as_tensor().dims().to_vec();
        for k in 0..x.len() {
            let shifted = |d: f64| {
                let mut y = x.clone();
                y[k] += d;
                let t = Tensor::from_vec(y, dims.as_slice(), &CPU).unwrap();
                let mut args = [
                    h1.as_tensor().clone(),
                    h2.as_tensor().clone(),
                    critic.as_tensor().clone(),
                    w_mu.as_tensor().clone(),
                    w_lv.as_tensor().clone(),
                ];
                args[which] = t;
                loss_at(&args[0], &args[1], &args[2], &args[3], &args[4])
                    .loss
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let fd = (shifted(eps) - shifted(-eps)) / (2.0 * eps);
            assert!(
                (fd - g[k]).abs() < 1e-6 * (1.0 + fd.abs()),
                "tensor {which} entry {k}: analytic {} vs finite difference {fd}",
                g[k]
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 12 + 12 + 4 + 12 + 6);
}

/// Same seed, same heads; another seed, other heads; `strip` drops exactly the MIB tensors.
#[test]
fn heads_are_seeded_and_stripped() {
    let shape = HeadShape {
        input: 4,
        width: 3,
        z_dim: 2,
    };
    let (a, b, c) = (
        f64_heads(shape, 3),
        f64_heads(shape, 3),
        f64_heads(shape, 4),
    );
    let v = |w: &HashMap<String, Tensor>| {
        w["mib.mu.1.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    assert_eq!(v(&a), v(&b));
    assert_ne!(v(&a), v(&c));
    assert_eq!(a.len(), 2 * 3 * 2 + 1);
    let mut w = a.clone();
    w.insert("score.weight".into(), t2(&[&[1.0]]));
    let s = mib::strip(&w);
    assert_eq!(s.keys().collect::<Vec<_>>(), vec!["score.weight"]);
    assert!(mib::has_heads(&w) && !mib::has_heads(&s));
    let bad = HeadShape { z_dim: 0, ..shape };
    assert!(mib::add_heads(&mut HashMap::new(), bad, 0, &CPU).is_err());
}

// ---- SPG ---------------------------------------------------------------------------------------

fn first_letter<'a>(s: &'a [&'a str]) -> impl FnMut(usize, usize) -> rlhf_train::Result<bool> + 'a {
    move |i, j| Ok(s[i].as_bytes()[0] == s[j].as_bytes()[0])
}

#[test]
fn clustering_confidence_and_selection_on_hand_made_samples() {
    let s = ["a1", "b1", "a2", "c1", "a3", "b2"];
    let clusters = cluster(s.len(), first_letter(&s)).unwrap();
    assert_eq!(clusters, vec![vec![0, 2, 4], vec![1, 5], vec![3]]);
    assert_eq!(largest(&clusters), Some(0));
    assert_eq!(confidence(&clusters), 0.5);
    let rewards = [0.1, 5.0, 0.9, -1.0, 0.4, 2.0];
    // γ = 0.5 keeps a prompt at exactly 0.5 (c ≥ γ); chosen = the largest cluster's best (2).
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..64 {
        match select(&clusters, &rewards, 0.5, &mut spg::prompt_rng(seed, 0)) {
            Selection::Pair {
                chosen,
                rejected,
                confidence,
            } => {
                assert_eq!(chosen, 2);
                assert_eq!(confidence, 0.5);
                assert!([1, 3, 5].contains(&rejected), "{rejected}");
                seen.insert(rejected);
            }
            other => panic!("{other:?}"),
        }
    }
    // Rejected is drawn from every other cluster's members, not always the same one.
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![1, 3, 5]);
    // Same seed, same draw.
    let a = select(&clusters, &rewards, 0.5, &mut spg::prompt_rng(9, 3));
    let b = select(&clusters, &rewards, 0.5, &mut spg::prompt_rng(9, 3));
    assert_eq!(a, b);
    // Just above the confidence: dropped.
    assert_eq!(
        select(&clusters, &rewards, 0.51, &mut spg::prompt_rng(0, 0)),
        Selection::LowConfidence(0.5)
    );
    // γ = 0 (select-all) keeps it too.
    assert!(matches!(
        select(&clusters, &rewards, 0.0, &mut spg::prompt_rng(0, 0)),
        Selection::Pair { chosen: 2, .. }
    ));
}

#[test]
fn all_equivalent_is_skipped_and_ties_go_to_the_earliest_cluster() {
    let s = ["x1", "x2", "x3"];
    let clusters = cluster(3, first_letter(&s)).unwrap();
    assert_eq!(clusters, vec![vec![0, 1, 2]]);
    assert_eq!(confidence(&clusters), 1.0);
    assert_eq!(
        select(&clusters, &[1.0, 2.0, 3.0], 0.0, &mut spg::prompt_rng(0, 0)),
        Selection::AllEquivalent
    );
    // Two clusters of 2: the first formed is the largest; c = 0.5.
    let s = ["b1", "a1", "a2", "b2"];
    let clusters = cluster(4, first_letter(&s)).unwrap();
    assert_eq!(clusters, vec![vec![0, 3], vec![1, 2]]);
    assert_eq!(largest(&clusters), Some(0));
    // Reward ties inside the cluster: the first member.
    match select(
        &clusters,
        &[1.0, 9.0, 9.0, 1.0],
        0.5,
        &mut spg::prompt_rng(0, 0),
    ) {
        Selection::Pair {
            chosen, rejected, ..
        } => {
            assert_eq!(chosen, 0);
            assert!(rejected == 1 || rejected == 2);
        }
        other => panic!("{other:?}"),
    }
}

/// A sample joins a cluster only if it and the representative entail each other: with
/// "premise starts with hypothesis" as entailment, `ab` ⇒ `a` but not back, so they stay apart,
/// and a later member is compared with the representative only.
#[test]
fn clustering_needs_entailment_both_ways() {
    let s = ["ab", "a", "ab", "abc"];
    let clusters = cluster(4, |i, j| Ok(s[i].starts_with(s[j]))).unwrap();
    assert_eq!(clusters, vec![vec![0, 2], vec![1], vec![3]]);
}

#[test]
fn reward_ranked_pairs() {
    let s: Vec<String> = ["p", "q", "r"].iter().map(|x| x.to_string()).collect();
    match reward_ranked(&s, &[0.5, -2.0, 3.0]) {
        Selection::Pair {
            chosen, rejected, ..
        } => assert_eq!((chosen, rejected), (2, 1)),
        other => panic!("{other:?}"),
    }
    let same: Vec<String> = vec!["z".into(), "z".into()];
    assert_eq!(reward_ranked(&same, &[1.0, 0.0]), Selection::Tie);
    assert_eq!(reward_ranked(&s[..1], &[1.0]), Selection::Tie);
}

/// Each testbed task's meaning-equivalence test, and the built-in fallback.
#[test]
fn task_equivalence_tests() {
    let arith = task_by_name("arithmetic", 0).unwrap();
    let p = "compute : 4 7 + 8 5 =";
    assert!(arith.equivalent(p, "1 3 2", "1 3 2 ="));
    assert!(!arith.equivalent(p, "1 3 2", "1 3"));
    assert!(!arith.equivalent(p, "1 3 2", "1 2 3"));
    let senti = task_by_name("sentiment", 0).unwrap();
    let q = "review : the plot was";
    assert!(senti.equivalent(q, "really charming .", "very good , and i loved it ."));
    assert!(senti.equivalent(q, "dull .", "very boring ."));
    // "not good" counts -0.5: inside the neutral dead zone, with "long".
    assert!(senti.equivalent(q, "not good .", "long ."));
    assert!(!senti.equivalent(q, "dull .", "long ."));
    assert!(!senti.equivalent(q, "great .", "terrible ."));
    let tr = task_by_name("translate", 0).unwrap();
    let r = "translate : the dog sees a cat .";
    assert!(tr.equivalent(r, "lo kado una mira vidas .", "lo kado vidas una mira ."));
    assert!(!tr.equivalent(r, "lo kado una mira vidas .", "la kado una mira vidas ."));
    assert_eq!(normalised_text("  The  End .  "), "the end");
    assert_eq!(normalised_text("wow !?"), "wow");
    // Symmetric and reflexive on every task.
    for t in [&arith, &senti, &tr] {
        for (a, b) in [("1 3 2", "1 2"), ("great .", "dull ."), ("x y", "y x")] {
            assert_eq!(t.equivalent("", a, b), t.equivalent("", b, a));
            assert!(t.equivalent("", a, a));
        }
    }
}

/// The configured equivalence: task-driven clustering of whole groups, and clear errors for
/// incomplete configurations.
#[test]
fn entailment_from_config() {
    let arith = task_by_name("arithmetic", 0).unwrap();
    let groups = vec![SampleGroup {
        prompt: "compute : 1 + 1 =".into(),
        samples: vec!["2".into(), "3".into(), "2 =".into(), "2".into()],
    }];
    let e = Entailment::from_config(&EquivalenceConfig::default(), Some(arith.as_ref())).unwrap();
    assert_eq!(
        e.cluster_all(&groups).unwrap(),
        vec![vec![vec![0, 2, 3], vec![1]]]
    );
    let text = EquivalenceConfig {
        kind: EquivalenceKind::Text,
        ..Default::default()
    };
    let e = Entailment::from_config(&text, None).unwrap();
    assert_eq!(
        e.cluster_all(&groups).unwrap(),
        vec![vec![vec![0, 3], vec![1], vec![2]]]
    );
    let err = |c: EquivalenceConfig| match Entailment::from_config(&c, None) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("accepted"),
    };
    assert!(err(EquivalenceConfig::default()).contains("needs a testbed `task`"));
    assert!(err(EquivalenceConfig {
        kind: EquivalenceKind::Command,
        ..Default::default()
    })
    .contains("equivalence.command"));
    assert!(err(EquivalenceConfig {
        kind: EquivalenceKind::Http,
        ..Default::default()
    })
    .contains("equivalence.url"));
    assert!(err(EquivalenceConfig {
        kind: EquivalenceKind::Text,
        threshold: 2.0,
        ..Default::default()
    })
    .contains("threshold"));
}

/// An external NLI command speaking the reward protocol: here a shell script that says
/// "entailed" (1) for every pair, so every group is one cluster; ordered pairs of distinct texts
/// are all it is asked about.
#[test]
fn external_nli_command() {
    let dir = std::env::temp_dir().join(format!("rlhf-rl-nli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("requests.txt");
    let cfg = EquivalenceConfig {
        kind: EquivalenceKind::Command,
        command: vec![
            "sh".into(),
            "-c".into(),
            format!(
                "cat > {0}; n=$(grep -o '\"completions\":\\[[^]]*\\]' {0} | grep -o '\",\\?\"\\|\"\\]' | wc -l); printf '['; i=0; while [ $i -lt $n ]; do [ $i -gt 0 ] && printf ','; printf '1'; i=$((i+1)); done; printf ']'",
                log.display()
            ),
        ],
        ..Default::default()
    };
    let e = Entailment::from_config(&cfg, None).unwrap();
    let groups = vec![SampleGroup {
        prompt: "q".into(),
        samples: vec!["a".into(), "b".into(), "a".into()],
    }];
    let clusters = e.cluster_all(&groups).unwrap();
    assert_eq!(clusters, vec![vec![vec![0, 1, 2]]]);
    let sent = std::fs::read_to_string(&log).unwrap();
    // (0,1), (1,0), (1,2), (2,1): four premise/hypothesis pairs, prompt prepended.
    assert!(
        sent.contains("\"prompts\":[\"q a\",\"q b\",\"q b\",\"q a\"]"),
        "{sent}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
