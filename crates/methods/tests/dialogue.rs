//! `dialogue-sft` and `dialogue-rl` on the testbed's dialogue game: the RL loss never reaches the
//! user model, the pieces of the loop against hand-computed values.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rlhf_data::testbed::dialogue as game;
use rlhf_lm::Message;
use rlhf_methods::dialogue_rl::{
    self, loo_advantages, prefix_cuts, DialogueRlConfig, UserModelKind,
};
use rlhf_methods::dialogue_sft::{self, DialogueSftConfig};
use rlhf_rl::conversation::Dialogue;
use rlhf_rl::dialogue::testbed_dialogue_model;
use rlhf_train::run::load_safetensors;

const CPU: Device = Device::Cpu;

fn game_model(root: &Path) -> PathBuf {
    let dir = root.join("init");
    testbed_dialogue_model(3, &CPU).unwrap().save(&dir).unwrap();
    dir
}

fn weights(dir: &Path) -> HashMap<String, Tensor> {
    load_safetensors(&dir.join("model.safetensors"), &CPU).unwrap()
}

fn identical(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> bool {
    a.len() == b.len()
        && a.iter().all(|(k, t)| {
            let u = &b[k];
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                == u.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        })
}

/// A few small iterations from an untrained game model.
fn small(model: &Path, out: PathBuf) -> DialogueRlConfig {
    let d = DialogueRlConfig::default();
    DialogueRlConfig {
        model: model.to_path_buf(),
        task: Some("dialogue".into()),
        output_dir: out,
        iterations: 2,
        prompts_per_step: 2,
        k: 2,
        turns: rlhf_rl::dialogue::TurnConfig {
            turn_limit: 3,
            max_turn_tokens: 6,
            ..d.turns.clone()
        },
        eval_games: 4,
        eval_conversations: 3,
        eval_every: 0,
        save_every: 1,
        optim: rlhf_rl::trainer::OptimConfig {
            lr: 1e-2,
            ..d.optim.clone()
        },
        ..d
    }
}

#[test]
fn rl_gradients_never_reach_a_separate_user_model() {
    let root = common::scratch("dialogue-separate");
    let init = game_model(&root);
    let base = weights(&init);
    // RL steps only (no supervised step): the user model must come out exactly as it went in,
    // while the policy moved.
    let mut c = small(&init, root.join("rl"));
    c.user_model = UserModelKind::Separate;
    c.supervised_every = 0;
    let s = dialogue_rl::run(&c, false, &CPU).unwrap();
    assert_eq!(s.imagined_episodes, 2 * 2 * 2);
    assert!(identical(&weights(&root.join("rl/user_model")), &base));
    assert!(!identical(&weights(&root.join("rl/model")), &base));
    // With supervised steps the user model does learn (so the check above can fail).
    let mut c = small(&init, root.join("rl-sl"));
    c.user_model = UserModelKind::Separate;
    c.supervised_every = 1;
    c.assistant_nll_weight = 0.0;
    dialogue_rl::run(&c, false, &CPU).unwrap();
    assert!(!identical(&weights(&root.join("rl-sl/user_model")), &base));
}

#[test]
fn the_shared_models_frozen_snapshot_is_what_the_user_plays() {
    let root = common::scratch("dialogue-shared");
    let init = game_model(&root);
    let base = weights(&init);
    // No refresh: after two RL (and supervised) steps the saved snapshot is still the start.
    let mut c = small(&init, root.join("rl"));
    c.snapshot_every = 0;
    c.supervised_every = 1;
    dialogue_rl::run(&c, false, &CPU).unwrap();
    let ck = root.join("rl/checkpoints/step-2");
    assert!(
        ck.is_dir(),
        "after iteration 1: an RL and a supervised step"
    );
    let snap = load_safetensors(&ck.join("user_snapshot.safetensors"), &CPU).unwrap();
    assert!(identical(&snap, &base));
    assert!(!identical(&weights(&ck), &base));
    // Refreshed every iteration: the snapshot is the weights of its checkpoint.
    let mut c = small(&init, root.join("rl-refresh"));
    c.snapshot_every = 1;
    c.supervised_every = 1;
    dialogue_rl::run(&c, false, &CPU).unwrap();
    let ck = root.join("rl-refresh/checkpoints/step-2");
    let snap = load_safetensors(&ck.join("user_snapshot.safetensors"), &CPU).unwrap();
    assert!(identical(&snap, &weights(&ck)));
}

#[test]
fn model_free_runs_count_real_episodes_and_evaluate_on_the_scripted_user() {
    let root = common::scratch("dialogue-model-free");
    let init = game_model(&root);
    let mut c = small(&init, root.join("rl"));
    c.rollout_user = dialogue_rl::RolloutUser::Environment;
    let s = dialogue_rl::run(&c, false, &CPU).unwrap();
    assert_eq!((s.real_episodes, s.imagined_episodes), (8, 0));
    assert_eq!(s.evals.len(), 2, "at the start and at the end");
    let e = &s.evals[1];
    assert_eq!(e.games, 4);
    // An untrained model's return: turns cost 0.1 each and a win adds 1.
    let expected = e.success_rate - 0.1 * e.mean_turns;
    assert!((e.mean_return - expected).abs() < 1e-9);
    assert!(e.user_nll.is_none(), "model-free trains no user model");
    // The first iteration samples from the reference itself: the KL between the sampler's
    // log-probs and the reference's teacher-forced ones over the branches' assistant tokens is
    // zero up to float error (token layout and scoring agree turn by turn).
    let first = &common::metrics(&root.join("rl/metrics.jsonl"))[0];
    let kl = first["kl"].as_f64().unwrap();
    assert!(kl.abs() < 1e-3, "kl at the first iteration {kl}");
}

#[test]
fn dialogue_sft_trains_both_roles_and_reports_held_out_nll() {
    let root = common::scratch("dialogue-sft");
    let init = game_model(&root);
    let task = game::DialogueTask::new(
        0,
        game::DialogueSize {
            logs: 64,
            eval_logs: 16,
            eval_games: 4,
        },
    );
    let (train, eval) = (root.join("logs.jsonl"), root.join("eval.jsonl"));
    game::write_logs(&train, task.logs()).unwrap();
    game::write_logs(&eval, task.eval_logs()).unwrap();
    let mut c = DialogueSftConfig {
        model: init.clone(),
        train_file: train.clone(),
        ..DialogueSftConfig::default()
    };
    c.fit.output_dir = root.join("sft");
    c.fit.eval_file = Some(eval);
    c.fit.epochs = 2;
    c.fit.batch_size = 16;
    c.fit.optim.lr = 3e-3;
    let s = dialogue_sft::run(&c, false, &CPU).unwrap();
    // 64 assistant views and 64 user views, 8 steps per epoch.
    assert_eq!((s.examples, s.steps), (128, 16));
    let (a, u) = (s.eval_assistant_nll.unwrap(), s.eval_user_nll.unwrap());
    // An untrained model over 54 words + 4 specials is near ln 58 = 4.06 per token; two short
    // epochs must bring both roles well below it.
    assert!(a < 3.5 && u < 3.5, "assistant {a}, user {u}");
    // A file of plain prompt/completion rows is refused with its line and field.
    std::fs::write(
        root.join("bad.jsonl"),
        "{\"prompt\": \"x\", \"completion\": \"y\"}\n",
    )
    .unwrap();
    c.train_file = root.join("bad.jsonl");
    let err = dialogue_sft::run(&c, false, &CPU).unwrap_err().to_string();
    assert!(
        err.contains("bad.jsonl") && err.contains("messages"),
        "{err}"
    );
}

#[test]
fn prefixes_and_leave_one_out_advantages() {
    let win = vec!["yes !".to_string()];
    let d = Dialogue {
        user_context: None,
        messages: [
            ("user", "guess my animal ."),
            ("assistant", "is it red ?"),
            ("user", "no ."),
            ("assistant", "what size is it ?"),
            ("user", "it is big ."),
            ("assistant", "is it the seal ?"),
            ("user", "yes ! it is the seal ."),
        ]
        .iter()
        .map(|(r, c)| Message::new(*r, *c))
        .collect(),
    };
    // After the opening, after one and after two real turns; never after the winning reply.
    assert_eq!(prefix_cuts(&d, 2, 6, &win), vec![1, 3, 5]);
    assert_eq!(prefix_cuts(&d, 5, 6, &win), vec![1, 3, 5]);
    assert_eq!(prefix_cuts(&d, 0, 6, &win), vec![1]);
    // The turn limit leaves no room after two turns when it is 2.
    assert_eq!(prefix_cuts(&d, 5, 2, &win), vec![1, 3]);
    // Groups of k = 2 and k = 3: R_i minus the mean of the others.
    let a = loo_advantages(&[1.0, 0.0, 0.7, 0.7], 2);
    assert_eq!(a, vec![1.0, -1.0, 0.0, 0.0]);
    let a = loo_advantages(&[0.9, 0.3, -0.6], 3);
    let want = [0.9 - (-0.15), 0.3 - 0.15, -0.6 - 0.6];
    for (x, y) in a.iter().zip(want) {
        assert!((x - y).abs() < 1e-12, "{a:?}");
    }
}

/// With LoRA the policy (and a separate user model) train adapters only: the run writes adapter
/// directories on the untouched base, and the user's frozen snapshot holds whole weights (the
/// base itself while adapters are unchanged, since `snapshot_every = 0` keeps the first one).
#[test]
fn dialogue_rl_with_lora_trains_adapters_and_keeps_whole_user_snapshots() {
    let root = common::scratch("dialogue-lora");
    let init = game_model(&root);
    let base = weights(&init);
    for (name, user) in [
        ("shared", UserModelKind::Shared),
        ("separate", UserModelKind::Separate),
    ] {
        let mut c = small(&init, root.join(name));
        c.user_model = user;
        c.snapshot_every = 0;
        c.supervised_every = 1;
        c.lora = rlhf_lm::lora::LoraConfig {
            r: 4,
            alpha: 8.0,
            target_modules: rlhf_lm::lora::TargetModules::Preset("all-linear".into()),
            ..Default::default()
        };
        dialogue_rl::run(&c, false, &CPU).unwrap();
        let model = root.join(name).join("model");
        assert!(
            model.join("adapter_config.json").exists(),
            "{name}: an adapter"
        );
        let p = rlhf_lm::Pretrained::load(&model, &CPU).unwrap();
        assert!(
            identical(&p.weights, &base),
            "{name}: the base is untouched"
        );
        let snap = load_safetensors(
            &root
                .join(name)
                .join("checkpoints/step-2/user_snapshot.safetensors"),
            &CPU,
        )
        .unwrap();
        assert!(
            identical(&snap, &base),
            "{name}: the first snapshot is the base"
        );
        if user == UserModelKind::Separate {
            assert!(root
                .join(name)
                .join("user_model/adapter_config.json")
                .exists());
        }
    }
}
