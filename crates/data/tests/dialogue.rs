//! The multi-turn `dialogue` testbed task: catalogue, scripted user, gold, logs, tokenizer.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use rand::rngs::StdRng;
use rand::SeedableRng;
use rlhf_data::jsonl;
use rlhf_data::testbed::dialogue::{
    self, catalogue, gold, is_success_reply, item_from_context, reply, scripted_game, user_context,
    DialogueSize, DialogueTask, Item, Log, CHAT_TEMPLATE, OPENING, TURN_LIMIT,
};
use rlhf_data::testbed::{task_by_name, testbed_tokenizer};
use rlhf_lm::{ChatTemplate, Message};

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

fn animal(name: &str) -> &'static Item {
    catalogue().iter().find(|it| it.name == name).unwrap()
}

fn conversation(turns: &[&str]) -> Vec<Message> {
    turns
        .iter()
        .enumerate()
        .map(|(i, t)| Message::new(if i % 2 == 0 { "user" } else { "assistant" }, *t))
        .collect()
}

#[test]
fn catalogue_table() {
    let cat = catalogue();
    assert_eq!(cat.len(), 16);
    let names: Vec<&str> = cat.iter().map(|it| it.name).collect();
    assert_eq!(
        names,
        [
            "fox", "cat", "owl", "frog", "crab", "seal", "duck", "goat", "bear", "wolf", "mole",
            "swan", "toad", "hare", "newt", "lynx"
        ]
    );
    let row = |i: usize| (cat[i].name, cat[i].colour, cat[i].size, cat[i].home);
    assert_eq!(row(0), ("fox", "red", "small", "land"));
    assert_eq!(row(5), ("seal", "blue", "big", "land"));
    assert_eq!(row(7), ("goat", "white", "big", "land"));
    assert_eq!(row(8), ("bear", "red", "small", "water"));
    assert_eq!(row(11), ("swan", "white", "small", "water"));
    assert_eq!(row(14), ("newt", "green", "big", "water"));
    assert_eq!(row(15), ("lynx", "white", "big", "water"));
    let combos: HashSet<_> = cat.iter().map(|it| (it.colour, it.size, it.home)).collect();
    assert_eq!(combos.len(), 16, "every (colour, size, home) is one animal");
    assert_eq!(cat.iter().filter(|it| it.home == "water").count(), 8);
    assert_eq!(cat.iter().filter(|it| it.size == "big").count(), 8);
    assert_eq!(cat.iter().filter(|it| it.colour == "green").count(), 4);
}

#[test]
fn scripted_user_replies() {
    let seal = animal("seal");
    let newt = animal("newt");
    let r = |item: &Item, m: &str| reply(item, m);
    let no_win = |s: &str| (s.to_string(), false);
    assert_eq!(r(seal, "what colour is it ?"), no_win("it is blue ."));
    assert_eq!(r(newt, "what colour is it ?"), no_win("it is green ."));
    assert_eq!(r(seal, "what size is it ?"), no_win("it is big ."));
    assert_eq!(
        r(animal("owl"), "what size is it ?"),
        no_win("it is small .")
    );
    assert_eq!(
        r(seal, "where does it live ?"),
        no_win("it lives on land .")
    );
    assert_eq!(
        r(newt, "where does it live ?"),
        no_win("it lives in water .")
    );
    assert_eq!(r(seal, "is it blue ?"), no_win("yes ."));
    assert_eq!(r(seal, "is it red ?"), no_win("no ."));
    assert_eq!(r(seal, "is it big ?"), no_win("yes ."));
    assert_eq!(r(seal, "is it small ?"), no_win("no ."));
    assert_eq!(r(newt, "is it white ?"), no_win("no ."));
    assert_eq!(r(seal, "does it live on land ?"), no_win("yes ."));
    assert_eq!(r(seal, "does it live in water ?"), no_win("no ."));
    assert_eq!(r(newt, "does it live on land ?"), no_win("no ."));
    assert_eq!(r(newt, "does it live in water ?"), no_win("yes ."));
    // Guesses.
    assert_eq!(
        r(seal, "is it the seal ?"),
        ("yes ! it is the seal .".to_string(), true)
    );
    assert_eq!(
        r(seal, "  is it  the seal ?\n"),
        ("yes ! it is the seal .".to_string(), true),
        "whitespace collapsed"
    );
    assert_eq!(
        r(seal, "is it the fox ?"),
        no_win("no , it is not the fox .")
    );
    // Malformed messages.
    for m in [
        "",
        "is it the zebra ?",
        "is it the seal",
        "is it land ?",
        "is it ?",
        "what colour ?",
        "what is it ?",
        "does it live on water ?",
        "is it the seal ? is it the fox ?",
        "guess my animal .",
    ] {
        assert_eq!(r(seal, m), no_win("i do not understand ."), "`{m}`");
    }
    // The questions list: 11 messages, all understood.
    let qs = dialogue::questions();
    assert_eq!(qs.len(), 11);
    assert!(qs.contains(&"does it live in water ?".to_string()));
    assert!(qs.contains(&"is it white ?".to_string()));
    for q in &qs {
        assert_ne!(r(seal, q).0, "i do not understand .", "{q}");
    }
}

#[test]
fn success_replies() {
    assert!(is_success_reply("yes ! it is the seal ."));
    assert!(is_success_reply("yes !"));
    assert!(is_success_reply(" yes  ! it is"));
    assert!(!is_success_reply("yes ."));
    assert!(!is_success_reply("no , it is not the fox ."));
    assert!(!is_success_reply("yes"));
    assert!(!is_success_reply(""));
    assert!(!is_success_reply("it is yes !"));
}

#[test]
fn gold_hand_computed() {
    let won = conversation(&[
        OPENING,
        "what colour is it ?",
        "it is blue .",
        "what size is it ?",
        "it is big .",
        "is it the seal ?",
        "yes ! it is the seal .",
    ]);
    assert!(close(gold(&won), 0.7), "{}", gold(&won));
    let lost = conversation(&[
        OPENING,
        "is it the fox ?",
        "no , it is not the fox .",
        "what colour is it ?",
        "it is blue .",
        "hello",
        "i do not understand .",
        "is it big ?",
        "yes .",
        "is it the duck ?",
        "no , it is not the duck .",
        "is it the goat ?",
        "no , it is not the goat .",
    ]);
    assert!(close(gold(&lost), -0.6), "{}", gold(&lost));
    let first_turn = conversation(&[OPENING, "is it the owl ?", "yes ! it is the owl ."]);
    assert!(close(gold(&first_turn), 0.9));
    assert!(close(gold(&conversation(&[OPENING])), 0.0));
    // A success reply counts only from the user.
    let claimed = conversation(&[OPENING, "yes ! i win", "i do not understand ."]);
    assert!(close(gold(&claimed), -0.1));
}

#[test]
fn user_context_round_trip() {
    assert_eq!(
        user_context(animal("seal")),
        "my animal is the seal . it is blue , big , and lives on land ."
    );
    assert_eq!(
        user_context(animal("newt")),
        "my animal is the newt . it is green , big , and lives in water ."
    );
    for item in catalogue() {
        let ctx = user_context(item);
        assert!(!ctx.contains("  ") && ctx.trim() == ctx, "single spaces");
        assert_eq!(item_from_context(&ctx), Some(item));
        assert_eq!(item_from_context(&format!("  {ctx} \n")), Some(item));
    }
    assert_eq!(item_from_context(""), None);
    assert_eq!(item_from_context("my animal is the zebra ."), None);
    assert_eq!(
        item_from_context("my animal is the seal . it is red , big , and lives on land ."),
        None,
        "attributes contradicting the name"
    );
}

/// Checks a log against the rules; returns (won, assistant turns).
fn check_log(log: &Log) -> (bool, usize) {
    let item = item_from_context(&log.user_context).expect("a valid user context");
    let m = &log.messages;
    assert_eq!(m[0], Message::new("user", OPENING));
    assert!(m.len() % 2 == 1, "ends with a user message");
    let turns = m.len() / 2;
    assert!((1..=TURN_LIMIT).contains(&turns));
    for (i, msg) in m.iter().enumerate() {
        assert_eq!(msg.role, if i % 2 == 0 { "user" } else { "assistant" });
        if i % 2 == 1 {
            assert_eq!(m[i + 1].content, reply(item, &msg.content).0);
        }
        if i % 2 == 0 && i + 1 < m.len() {
            assert!(!is_success_reply(&msg.content), "the game ends at a win");
        }
    }
    let won = is_success_reply(&m[m.len() - 1].content);
    assert!(
        won || turns == TURN_LIMIT,
        "ends at a win or the turn limit"
    );
    let expected = if won { 1.0 } else { 0.0 } - 0.1 * turns as f64;
    assert!(close(gold(m), expected));
    (won, turns)
}

#[test]
fn logs_deterministic_and_valid() {
    let size = DialogueSize::default();
    assert_eq!(
        (size.logs, size.eval_logs, size.eval_games),
        (2000, 200, 200)
    );
    let a = DialogueTask::new(7, size);
    let b = DialogueTask::new(7, size);
    let c = DialogueTask::new(8, size);
    assert_eq!(a.logs(), b.logs());
    assert_eq!(a.eval_logs(), b.eval_logs());
    assert_eq!(a.eval_contexts(), b.eval_contexts());
    assert_ne!(a.logs(), c.logs());
    assert_ne!(a.eval_logs(), c.eval_logs());
    assert_eq!(a.logs().len(), 2000);
    assert_eq!(a.eval_logs().len(), 200);
    assert_eq!(a.eval_contexts().len(), 200);
    assert_ne!(&a.logs()[..200], a.eval_logs(), "separate streams");
    // The streams are independent: other sizes leave the held-out data unchanged.
    let small = DialogueTask::new(
        7,
        DialogueSize {
            logs: 10,
            eval_logs: 200,
            eval_games: 200,
        },
    );
    assert_eq!(small.logs(), &a.logs()[..10]);
    assert_eq!(small.eval_logs(), a.eval_logs());
    assert_eq!(small.eval_contexts(), a.eval_contexts());

    let mut wins = 0;
    let mut turns = 0;
    let mut total_gold = 0.0;
    let mut animals = HashMap::new();
    for log in a.logs().iter().chain(a.eval_logs()) {
        let (won, t) = check_log(log);
        wins += usize::from(won);
        turns += t;
        total_gold += gold(&log.messages);
        *animals.entry(log.user_context.clone()).or_insert(0) += 1;
    }
    assert_eq!(animals.len(), 16, "every animal is hidden in some log");
    let n = 2200.0;
    let (rate, mean_turns, mean_gold) = (wins as f64 / n, turns as f64 / n, total_gold / n);
    println!("seed 7, 2200 logs: success {rate:.3}, turns {mean_turns:.2}, gold {mean_gold:.3}");
    // The module docs measure 0.409, 5.24 and -0.115 over 100,000 games; over 2200 games the
    // standard errors are about 0.011 (rate), 0.03 (turns) and 0.012 (gold). Seed 7 gives 0.399,
    // 5.26 and -0.127.
    assert!((0.36..=0.46).contains(&rate), "success rate {rate}");
    assert!((5.1..=5.4).contains(&mean_turns), "mean turns {mean_turns}");
    assert!(
        (-0.19..=-0.05).contains(&mean_gold),
        "mean gold {mean_gold}"
    );
}

#[test]
fn scripted_game_against_every_animal() {
    let mut rng = StdRng::seed_from_u64(3);
    for item in catalogue() {
        for _ in 0..50 {
            let log = scripted_game(item, &mut rng);
            assert_eq!(log.user_context, user_context(item));
            check_log(&log);
        }
    }
}

#[test]
fn eval_contexts_balanced() {
    for games in [200, 20, 16, 3] {
        let task = DialogueTask::new(
            5,
            DialogueSize {
                logs: 1,
                eval_logs: 1,
                eval_games: games,
            },
        );
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for ctx in task.eval_contexts() {
            let item = item_from_context(ctx).expect("a valid context");
            *counts.entry(item.name).or_insert(0) += 1;
        }
        let (lo, hi) = (games / 16, games.div_ceil(16));
        assert_eq!(counts.len(), games.min(16));
        for item in catalogue() {
            let k = counts.get(item.name).copied().unwrap_or(0);
            assert!((lo..=hi).contains(&k), "{games} games: {} {k}", item.name);
        }
    }
    // The order is shuffled, not the catalogue order.
    let task = DialogueTask::new(5, DialogueSize::default());
    let names: Vec<&str> = task.eval_contexts()[..16]
        .iter()
        .map(|c| item_from_context(c).unwrap().name)
        .collect();
    let catalogue_order: Vec<&str> = catalogue().iter().map(|it| it.name).collect();
    assert_ne!(names, catalogue_order);
}

#[test]
fn tokenizer_round_trips_conversations() {
    let tok = dialogue::tokenizer();
    for (id, t) in ["<pad>", "<s>", "</s>", "<unk>"].iter().enumerate() {
        assert_eq!(tok.token_to_id(t), Some(id as u32));
    }
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(tok.eos_token_id(), Some(2));
    assert_eq!(tok.pad_token_id, Some(0));
    let words = dialogue::vocabulary();
    assert!(words.windows(2).all(|w| w[0] < w[1]), "sorted and distinct");
    assert_eq!(tok.vocab_size(), words.len() + 4);
    for (i, w) in words.iter().enumerate() {
        assert_eq!(tok.token_to_id(w), Some(i as u32 + 4), "{w}");
    }
    for w in [
        "user",
        "assistant",
        "system",
        ":",
        "fox",
        "lynx",
        "!",
        ",",
        "?",
    ] {
        assert!(words.contains(&w.to_string()), "{w}");
    }
    // Hand-counted: 16 animals, 4 colours, 2 sizes, land and water, the 4 template words,
    // 4 punctuation marks (. ? ! ,) and 22 other words of questions, replies, the opening and the
    // user context.
    assert_eq!(words.len(), 54);

    let template = ChatTemplate::new(
        CHAT_TEMPLATE,
        Some("<s>".to_string()),
        Some("</s>".to_string()),
    )
    .unwrap();
    let messages = conversation(&[OPENING, "what size is it ?", "it is big ."]);
    let text = template.render(&messages, false).unwrap();
    assert_eq!(
        text,
        "user : guess my animal . </s> assistant : what size is it ? </s> user : it is big . </s>"
    );
    assert_eq!(
        template.render(&messages, true).unwrap(),
        format!("{text} assistant :")
    );
    let unk = tok.token_to_id("<unk>").unwrap();
    let eos = tok.eos_token_id().unwrap();
    let task = DialogueTask::new(1, DialogueSize::default());
    for log in task.logs().iter().take(300) {
        for gen in [false, true] {
            let text = template.render(&log.messages, gen).unwrap();
            let ids = tok.encode(&text, false).unwrap();
            assert!(!ids.contains(&unk), "<unk> in `{text}`");
            assert_eq!(ids.len(), text.split(' ').count());
            assert_eq!(
                ids.iter().filter(|&&i| i == eos).count(),
                log.messages.len(),
                "one </s> per turn"
            );
            assert_eq!(tok.decode(&ids, false).unwrap(), text, "round trip");
        }
        let ctx = tok.encode(&log.user_context, false).unwrap();
        assert!(!ctx.contains(&unk));
        assert_eq!(tok.decode(&ctx, false).unwrap(), log.user_context);
    }
}

#[test]
fn testbed_tokenizer_unchanged() {
    // Values computed before the word-level builder was shared with the dialogue tokenizer.
    let tok = testbed_tokenizer();
    assert_eq!(tok.vocab_size(), 224);
    for (w, id) in [
        ("<pad>", 0),
        ("<s>", 1),
        ("</s>", 2),
        ("<unk>", 3),
        ("+", 5),
        (".", 7),
        ("0", 8),
        ("9", 17),
        (":", 18),
        ("=", 19),
        ("compute", 61),
        ("movie", 129),
        ("plot", 152),
        ("the", 186),
    ] {
        assert_eq!(tok.token_to_id(w), Some(id), "{w}");
    }
    assert_eq!(tok.token_to_id("lynx"), None, "dialogue words stay out");
}

#[test]
fn dialogue_is_not_a_single_turn_task() {
    let err = task_by_name("dialogue", 1).err().expect("refused");
    assert!(
        err.contains("multi-turn")
            && err.contains("dialogue-rl")
            && err.contains("compare-dialogue"),
        "{err}"
    );
}

#[test]
fn logs_written_as_conversational_jsonl() {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("rlhf-dialogue-logs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("logs.jsonl");
    let task = DialogueTask::new(
        2,
        DialogueSize {
            logs: 30,
            eval_logs: 1,
            eval_games: 1,
        },
    );
    dialogue::write_logs(&path, task.logs()).unwrap();
    let lines = jsonl::read(&path).unwrap();
    assert_eq!(lines.len(), 30);
    for (line, log) in lines.iter().zip(task.logs()) {
        assert_eq!(line.messages("messages").unwrap(), log.messages);
        assert_eq!(line.string("user_context").unwrap(), log.user_context);
    }
    let first = std::fs::read_to_string(&path).unwrap();
    let first = first.lines().next().unwrap();
    assert!(
        first.starts_with(r#"{"messages":[{"role":"user","content":"guess my animal ."}"#)
            || first.contains(r#""messages":[{"content":"guess my animal .","role":"user"}"#),
        "{first}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
