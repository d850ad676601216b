//! The multi-turn rollout engine against the testbed's scripted user: transcripts, token layout
//! and role masks, termination, and the external-user protocol.

use candle_core::Device;
use rlhf_data::testbed::dialogue as game;
use rlhf_lm::generate::{FinishReason, Sample, SamplingParams};
use rlhf_lm::{Episode, Message, Role, Tokenizer};
use rlhf_rl::conversation::{transcript, Dialogue, Renderer, View};
use rlhf_rl::dialogue::{
    renderer_for, roll_out, success_return, testbed_dialogue_model, AssistantSpeaker, Branch,
    ExternalUser, ScriptedUser, TurnConfig, UserSimulator,
};

const CPU: Device = Device::Cpu;

/// An assistant that says its script's n-th line at its n-th turn of a dialogue (counted from the
/// `assistant` header tokens in the prompt), with log-prob -1 per token.
struct Script {
    lines: Vec<&'static str>,
    tokenizer: Tokenizer,
    eos: u32,
}

impl AssistantSpeaker for Script {
    fn speak(
        &self,
        prompts: &[Vec<u32>],
        _: &SamplingParams,
        _: usize,
    ) -> rlhf_train::Result<Vec<Sample>> {
        let header = self.tokenizer.encode("assistant", false).unwrap()[0];
        Ok(prompts
            .iter()
            .map(|p| {
                let turn = p.iter().filter(|&&t| t == header).count() - 1;
                let line = self.lines[turn.min(self.lines.len() - 1)];
                let mut tokens = self.tokenizer.encode(line, false).unwrap();
                tokens.push(self.eos);
                Sample {
                    logprobs: vec![-1.0; tokens.len()],
                    tokens,
                    finish: FinishReason::Eos,
                }
            })
            .collect())
    }
    fn decode(&self, ids: &[u32]) -> rlhf_train::Result<String> {
        Ok(self.tokenizer.decode(ids, true)?)
    }
    fn eos_ids(&self) -> &[u32] {
        std::slice::from_ref(&self.eos)
    }
}

/// The renderer over the dialogue model's own chat template.
fn renderer(lm: &rlhf_rl::policy::TrainableLm) -> Renderer<'_> {
    renderer_for(lm.chat_template.as_ref(), &lm.tokenizer, &lm.eos_ids).unwrap()
}

/// A script that says `lines` in turn, for the game's model.
fn script(lm: &rlhf_rl::policy::TrainableLm, lines: Vec<&'static str>) -> Script {
    Script {
        lines,
        tokenizer: lm.tokenizer.clone(),
        eos: lm.eos_ids[0],
    }
}

/// The owl game continued from a real prefix (`is it small ?` `yes .`) by one scripted turn,
/// `is it the owl ?`, which wins.
fn owl_guessed_after_a_real_turn(lm: &rlhf_rl::policy::TrainableLm, r: &Renderer) -> Branch {
    let prefix = [
        ("user", game::OPENING),
        ("assistant", "is it small ?"),
        ("user", "yes ."),
    ];
    let mut b = vec![start(owl(), &prefix, r)];
    let script = script(lm, vec!["unused", "is it the owl ?"]);
    roll_out(&script, r, &ScriptedUser, &mut b, &TurnConfig::default(), 0).unwrap();
    b.pop().unwrap()
}

fn owl() -> &'static game::Item {
    &game::catalogue()[2]
}

fn start(item: &game::Item, messages: &[(&str, &str)], r: &Renderer) -> Branch {
    Branch::start(
        r,
        Dialogue {
            user_context: Some(game::user_context(item)),
            messages: messages.iter().map(|(a, b)| Message::new(*a, *b)).collect(),
        },
    )
    .unwrap()
}

/// The episode's spans as (role, ids of `text`).
fn spans(tok: &Tokenizer, expected: &[(Role, &str)]) -> Episode {
    let mut e = Episode::default();
    for (role, text) in expected {
        e = e.with(*role, tok.encode(text, false).unwrap());
    }
    e
}

#[test]
fn a_scripted_game_reproduces_the_hand_written_transcript() {
    let lm = testbed_dialogue_model(0, &CPU).unwrap();
    let r = renderer(&lm);
    let script = script(
        &lm,
        vec!["what colour is it ?", "is it the fox ?", "is it the owl ?"],
    );
    let mut b = vec![start(owl(), &[("user", game::OPENING)], &r)];
    roll_out(
        &script,
        &r,
        &ScriptedUser,
        &mut b,
        &TurnConfig::default(),
        0,
    )
    .unwrap();
    let b = &b[0];
    let said: Vec<(&str, &str)> = b
        .dialogue
        .messages
        .iter()
        .map(|m| (m.role.as_str(), m.content.as_str()))
        .collect();
    assert_eq!(
        said,
        [
            ("user", "guess my animal ."),
            ("assistant", "what colour is it ?"),
            ("user", "it is green ."),
            ("assistant", "is it the fox ?"),
            ("user", "no , it is not the fox ."),
            ("assistant", "is it the owl ?"),
            ("user", "yes ! it is the owl ."),
        ]
    );
    assert!(b.won && b.done);
    assert!((success_return(b, 0.1) - 0.7).abs() < 1e-12);
    assert!((game::gold(&b.dialogue.messages) - 0.7).abs() < 1e-12);
    // The RL episode: the opening is context; each assistant turn (content + </s>) is trained,
    // each user reply is the user's, every template word is context.
    use Role::{Assistant as A, Prompt as P, User as U};
    let want = spans(
        &lm.tokenizer,
        &[
            (P, "<s> user : guess my animal . </s> assistant :"),
            (A, "what colour is it ? </s>"),
            (P, "user :"),
            (U, "it is green . </s>"),
            (P, "assistant :"),
            (A, "is it the fox ? </s>"),
            (P, "user :"),
            (U, "no , it is not the fox . </s>"),
            (P, "assistant :"),
            (A, "is it the owl ? </s>"),
            (P, "user :"),
            (U, "yes ! it is the owl . </s>"),
        ],
    );
    assert_eq!(b.rl_episode(), want);
    // 18 assistant targets (three turns of 5 words + </s>), 22 user targets.
    let roles = b.rl_episode().target_roles();
    assert_eq!(roles.iter().filter(|&&x| x == A).count(), 18);
    assert_eq!(roles.iter().filter(|&&x| x == U).count(), 22);
    // The sampler's log-probs of exactly those 18 tokens.
    assert_eq!(b.sampled_logprobs(), vec![-1.0; 18]);
    // The whole text is the chat template's rendering of the conversation.
    let rendered = lm
        .chat_template
        .as_ref()
        .unwrap()
        .render(&b.dialogue.messages, false)
        .unwrap();
    assert_eq!(
        lm.tokenizer.encode(&rendered, true).unwrap(),
        b.rl_episode().ids()
    );
}

#[test]
fn a_real_prefix_is_context_for_rl_and_the_user_view_trains_user_turns() {
    let lm = testbed_dialogue_model(0, &CPU).unwrap();
    let r = renderer(&lm);
    let b = [owl_guessed_after_a_real_turn(&lm, &r)];
    let b = &b[0];
    assert_eq!(b.prefix, 3);
    assert_eq!(b.dialogue.messages.len(), 5);
    use Role::{Assistant as A, Prompt as P, User as U};
    // RL: the real prefix's assistant turn is context; only the rollout's turn is trained.
    assert_eq!(
        b.rl_episode(),
        spans(
            &lm.tokenizer,
            &[
                (
                    P,
                    "<s> user : guess my animal . </s> assistant : is it small ? </s> user : yes . </s> assistant :"
                ),
                (A, "is it the owl ? </s>"),
                (P, "user :"),
                (U, "yes ! it is the owl . </s>"),
            ]
        )
    );
    // Supervised assistant view: every assistant turn, the prefix's included.
    assert_eq!(
        b.view_episode(View::Assistant),
        spans(
            &lm.tokenizer,
            &[
                (P, "<s> user :"),
                (U, "guess my animal . </s>"),
                (P, "assistant :"),
                (A, "is it small ? </s>"),
                (P, "user :"),
                (U, "yes . </s>"),
                (P, "assistant :"),
                (A, "is it the owl ? </s>"),
                (P, "user :"),
                (U, "yes ! it is the owl . </s>"),
            ]
        )
    );
    // User view: the private context first (context), then the same turns.
    let ctx = game::user_context(owl());
    let head = format!("<s> system : {ctx} </s> user :");
    assert_eq!(
        b.view_episode(View::User),
        spans(
            &lm.tokenizer,
            &[
                (P, head.as_str()),
                (U, "guess my animal . </s>"),
                (P, "assistant :"),
                (A, "is it small ? </s>"),
                (P, "user :"),
                (U, "yes . </s>"),
                (P, "assistant :"),
                (A, "is it the owl ? </s>"),
                (P, "user :"),
                (U, "yes ! it is the owl . </s>"),
            ]
        )
    );
    // The user's next-turn prompt ends with the user header.
    let prompt = b.prompt(&r, View::User).unwrap();
    let tail = lm.tokenizer.encode("user :", false).unwrap();
    assert_eq!(&prompt[prompt.len() - 2..], tail.as_slice());
}

#[test]
fn games_stop_at_the_turn_limit_and_at_the_horizon() {
    let lm = testbed_dialogue_model(0, &CPU).unwrap();
    let r = renderer(&lm);
    let script = script(&lm, vec!["what size is it ?"]);
    let opening = [("user", game::OPENING)];
    let mut b = [start(owl(), &opening, &r), start(owl(), &opening, &r)];
    let mut short = TurnConfig::default();
    roll_out(&script, &r, &ScriptedUser, &mut b[..1], &short, 0).unwrap();
    short.horizon = 2;
    roll_out(&script, &r, &ScriptedUser, &mut b[1..], &short, 0).unwrap();
    // Six questions, six answers, lost: 1 + 2 * 6 messages, return -0.6.
    assert_eq!(b[0].dialogue.messages.len(), 13);
    assert_eq!(b[0].dialogue.messages[12].content, "it is small .");
    assert!(!b[0].won && b[0].done);
    assert!((success_return(&b[0], 0.1) + 0.6).abs() < 1e-12);
    // Horizon 2: two turns, then the branch stops.
    assert_eq!(b[1].new_assistant_turns(), 2);
    assert_eq!(b[1].dialogue.messages.len(), 5);
}

#[test]
fn external_users_speak_json_and_a_command_user_can_win() {
    let win = vec!["yes !".to_string()];
    let r = ExternalUser::parse_replies(
        r#"{"replies": [{"content": "it is red .", "won": false}, "yes ! it is the fox ."]}"#,
        2,
        &win,
    )
    .unwrap();
    assert_eq!(r[0].content, "it is red .");
    assert!(!r[0].won && !r[0].done);
    assert!(r[1].won && r[1].done, "a bare string wins by its prefix");
    let err = ExternalUser::parse_replies(r#"{"replies": ["a"]}"#, 2, &win).unwrap_err();
    assert!(err.contains("1 replies for 2"), "{err}");
    let err =
        ExternalUser::parse_replies(r#"[{"content": "x", "won": "yes"}]"#, 1, &win).unwrap_err();
    assert!(err.contains("replies[0].won"), "{err}");

    let lm = testbed_dialogue_model(0, &CPU).unwrap();
    let rd = renderer(&lm);
    let user = ExternalUser::command(
        vec![
            "sh".into(),
            "-c".into(),
            r#"cat > /dev/null; echo '{"replies": ["yes ! it is the owl ."]}'"#.into(),
        ],
        std::time::Duration::from_secs(20),
        0,
        0.0,
        win,
    )
    .unwrap();
    assert!(user.describe().starts_with("user command"));
    let script = script(&lm, vec!["is it the owl ?"]);
    let mut b = vec![start(owl(), &[("user", game::OPENING)], &rd)];
    roll_out(&script, &rd, &user, &mut b, &TurnConfig::default(), 0).unwrap();
    assert!(b[0].won);
    assert_eq!(b[0].dialogue.messages.len(), 3);
    // The scorer's view: the opening as the prompt, the rest as the completion.
    let (p, c) = transcript(lm.chat_template.as_ref().unwrap(), &b[0].dialogue.messages).unwrap();
    assert_eq!(p, "user : guess my animal . </s>");
    assert_eq!(
        c,
        " assistant : is it the owl ? </s> user : yes ! it is the owl . </s>"
    );
}

#[test]
fn the_rl_loss_reaches_the_rollouts_assistant_tokens_and_the_user_nll_the_user_tokens() {
    use candle_core::{Tensor, Var};
    use rlhf_lm::score::EpisodeBatch;
    use rlhf_rl::objectives::{masked_nll, masked_sequence_loss};
    let lm = testbed_dialogue_model(0, &CPU).unwrap();
    let r = renderer(&lm);
    let b = [owl_guessed_after_a_real_turn(&lm, &r)];
    // Any per-token log-probs will do: the gradient of each loss w.r.t. them says which
    // positions it can move.
    let grad_positions = |episode: Episode, user: bool| -> Vec<usize> {
        let batch = EpisodeBatch::new(&[episode], lm.pad_id, &CPU).unwrap();
        let width = batch.target_mask.dims2().unwrap().1;
        let values: Vec<f32> = (0..width).map(|j| -0.1 - 0.01 * j as f32).collect();
        let lp = Var::from_tensor(&Tensor::from_vec(values, (1, width), &CPU).unwrap()).unwrap();
        let loss = if user {
            masked_nll(lp.as_tensor(), &batch.user_mask).unwrap()
        } else {
            masked_sequence_loss(lp.as_tensor(), &batch.assistant_mask, &[2.0]).unwrap()
        };
        let g = loss.backward().unwrap();
        let g = g.get(lp.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        (0..width).filter(|&j| g[0][j] != 0.0).collect()
    };
    // RL: only the targets of the rollout's own assistant turn (`is it the owl ? </s>`, 6 tokens),
    // which follow the 22-token prefix `<s> user : guess my animal . </s> assistant : is it small
    // ? </s> user : yes . </s> assistant :` (8 + 2 + 5 + 2 + 3 + 2): targets 21..27 predict tokens
    // 22..28.
    let rl = grad_positions(b[0].rl_episode(), false);
    assert_eq!(rl, (21..27).collect::<Vec<_>>());
    // User NLL on the user view: the user's three messages, never the assistant's or the context.
    let uv = b[0].view_episode(View::User);
    let want: Vec<usize> = uv
        .target_roles()
        .iter()
        .enumerate()
        .filter(|(_, &x)| x == Role::User)
        .map(|(j, _)| j)
        .collect();
    assert_eq!(
        want.len(),
        5 + 3 + 8,
        "guess my animal . / yes . / yes ! it is the owl ."
    );
    assert_eq!(grad_positions(uv, true), want);
}

#[test]
fn role_log_prob_sums_keep_each_rows_own_role() {
    use rlhf_lm::score::{episode_logprobs, EpisodeBatch};
    use rlhf_rl::conversation::{view_episode, view_role};
    use rlhf_rl::objectives::{role_logprob_sum, role_nll_per_token};
    let lm = testbed_dialogue_model(0, &CPU).unwrap();
    let r = renderer(&lm);
    let task = game::DialogueTask::new(
        1,
        game::DialogueSize {
            logs: 2,
            eval_logs: 1,
            eval_games: 1,
        },
    );
    let log = &task.logs()[0];
    let d = Dialogue {
        user_context: Some(log.user_context.clone()),
        messages: log.messages.clone(),
    };
    // Row 0 clones the assistant, row 1 models the user, of the same game.
    let views = [View::Assistant, View::User];
    let episodes: Vec<Episode> = views
        .iter()
        .map(|&v| view_episode(&r, &d, v).unwrap())
        .collect();
    let roles: Vec<Role> = views.iter().map(|&v| view_role(v)).collect();
    assert_eq!(roles, [Role::Assistant, Role::User]);
    let model = lm.model(&CPU).unwrap();
    let (sum, n) = role_logprob_sum(&model, &episodes, &roles, lm.pad_id, &CPU).unwrap();
    // The same sum picked on the host from the per-target log-probs and the episodes' roles.
    let batch = EpisodeBatch::new(&episodes, lm.pad_id, &CPU).unwrap();
    let lp = episode_logprobs(&model, &batch, 1.0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let (mut want, mut count) = (0f64, 0usize);
    for (i, e) in episodes.iter().enumerate() {
        for (j, role) in e.target_roles().iter().enumerate() {
            if *role == roles[i] {
                want += lp[i][j] as f64;
                count += 1;
            }
        }
    }
    let n_assistant = log
        .messages
        .iter()
        .filter(|m| m.role == "assistant")
        .count();
    assert!(count > 2 * n_assistant, "both rows contribute");
    assert_eq!(n, count as f64);
    let got = sum.to_scalar::<f32>().unwrap() as f64;
    assert!(
        (got - want).abs() < 1e-3 * want.abs().max(1.0),
        "{got} vs {want}"
    );
    // Per token, in chunks of one episode: the same mean.
    let per = role_nll_per_token(&model, &episodes, &roles, lm.pad_id, 1, &CPU).unwrap();
    assert!((per + want / count as f64).abs() < 1e-4, "{per}");
}
