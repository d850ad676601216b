//! `dialogue`: a multi-turn guessing game, in the spirit of LMRL-Gym's Twenty Questions. It is
//! not a single-turn [`Task`](super::Task): `rlhf dialogue-rl` and `rlhf compare-dialogue` use it.
//!
//! A scripted user holds a hidden animal from a catalogue of 16. Animal `i` (in [`catalogue`]
//! order: fox, cat, owl, frog, crab, seal, duck, goat, bear, wolf, mole, swan, toad, hare, newt,
//! lynx) has colour `[red, blue, green, white][i % 4]`, size `[small, big][(i / 4) % 2]` and home
//! `[land, water][i / 8]`, so each (colour, size, home) triple names exactly one animal and
//! `log2 16 = 4` bits identify it: a colour question gives 2 bits, a size or home question 1.
//!
//! The conversation opens with the user's [`OPENING`] (`guess my animal .`); assistant and user
//! then alternate. The user understands these assistant messages (word sequences compared after
//! collapsing whitespace) and answers as [`reply`] does:
//!
//! | assistant | user |
//! |---|---|
//! | `what colour is it ?` | `it is <colour> .` |
//! | `what size is it ?` | `it is <size> .` |
//! | `where does it live ?` | `it lives on land .` / `it lives in water .` |
//! | `is it <colour or size> ?` | `yes .` / `no .` |
//! | `does it live on land ?`, `does it live in water ?` | `yes .` / `no .` |
//! | `is it the <animal> ?` | `yes ! it is the <animal> .` (won) / `no , it is not the <animal> .` |
//! | anything else | `i do not understand .` |
//!
//! A game ends at a right guess or once the [`TURN_LIMIT`]-th (6th) assistant message has been
//! answered. Gold of a finished conversation with `n` assistant messages:
//!
//! `gold = [won] - TURN_COST * n`, with `TURN_COST = 0.1`, so gold lies in [-0.6, 0.9]: a first-turn
//! right guess scores 0.9, the best a strategy that must identify the animal can guarantee is a
//! colour question, then size, then home, then the guess: 4 turns, 0.6. A lost game scores -0.6.
//!
//! The user's private context ([`user_context`], what a user simulator conditions on and the
//! assistant never sees) states the animal and its attributes:
//! `my animal is the seal . it is blue , big , and lives on land .`
//!
//! The logged conversations ([`DialogueTask::logs`]) come from a mediocre scripted assistant
//! ([`scripted_game`]). At each turn it asks, with probability [`ASK_PROBABILITY`] (0.5), a
//! question drawn uniformly from the 11 the user understands ([`questions`]; repeats and
//! redundant questions allowed); with probability [`CONSISTENT_GUESS_PROBABILITY`] (0.35) it
//! guesses an animal drawn uniformly among those consistent with every answer so far (a wrong
//! guess rules that animal out); otherwise (0.15) it guesses an animal drawn uniformly from the
//! whole catalogue. Over 100,000 games (each animal hidden equally often, seed 12345) it wins 0.409
//! of them, in 5.24 assistant turns on average, for a mean gold of -0.115 (won games score 0.585 on
//! average, i.e. are won in 4.15 turns; lost ones score -0.6). Over 2000 logs the success rate has
//! a standard error of about 0.011. These are the probabilities first chosen: the success rate
//! lies inside, though at the low end of, the 0.4-0.75 band aimed at for a mediocre assistant, with
//! much room above it for a trained one (an assistant that asks colour, size and home and then
//! guesses wins every game, gold 0.6). Shifting weight from questions to consistent guesses raises
//! it only slowly (ask 0.45, consistent 0.4: 0.428; ask 0.4, consistent 0.45: 0.439).
//!
//! The task has its own word-level [`tokenizer`] over its own [`vocabulary`] (the chat-template
//! words included), built like [`testbed_tokenizer`](super::testbed_tokenizer), and a
//! [`CHAT_TEMPLATE`] in which every turn ends with `</s>`.

use std::collections::BTreeSet;
use std::path::Path;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rlhf_lm::Message;
use serde_json::json;

use super::{word_level_tokenizer, write_jsonl, BOS, EOS, PAD};

/// One animal of the catalogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Item {
    pub name: &'static str,
    pub colour: &'static str,
    pub size: &'static str,
    /// `land` or `water`.
    pub home: &'static str,
}

/// The user's first message.
pub const OPENING: &str = "guess my animal .";
/// Assistant messages per game.
pub const TURN_LIMIT: usize = 6;
/// Gold lost per assistant message.
pub const TURN_COST: f64 = 0.1;
/// The reply to a message the user does not understand.
pub const NOT_UNDERSTOOD: &str = "i do not understand .";

/// The scripted assistant's probability of asking a question at a turn.
pub const ASK_PROBABILITY: f64 = 0.5;
/// The scripted assistant's probability of guessing an animal consistent with the answers so far.
pub const CONSISTENT_GUESS_PROBABILITY: f64 = 0.35;
/// The scripted assistant's probability of guessing an animal from the whole catalogue.
pub const RANDOM_GUESS_PROBABILITY: f64 = 0.15;

pub const COLOURS: [&str; 4] = ["red", "blue", "green", "white"];
pub const SIZES: [&str; 2] = ["small", "big"];
pub const HOMES: [&str; 2] = ["land", "water"];
const NAMES: [&str; 16] = [
    "fox", "cat", "owl", "frog", "crab", "seal", "duck", "goat", "bear", "wolf", "mole", "swan",
    "toad", "hare", "newt", "lynx",
];

const fn item(i: usize) -> Item {
    Item {
        name: NAMES[i],
        colour: COLOURS[i % 4],
        size: SIZES[(i / 4) % 2],
        home: HOMES[i / 8],
    }
}

static CATALOGUE: [Item; 16] = [
    item(0),
    item(1),
    item(2),
    item(3),
    item(4),
    item(5),
    item(6),
    item(7),
    item(8),
    item(9),
    item(10),
    item(11),
    item(12),
    item(13),
    item(14),
    item(15),
];

/// The 16 animals, in the fixed order of the module docs.
pub fn catalogue() -> &'static [Item] {
    &CATALOGUE
}

fn by_name(name: &str) -> Option<&'static Item> {
    CATALOGUE.iter().find(|it| it.name == name)
}

/// `on land` or `in water`.
fn home_phrase(home: &str) -> &'static str {
    if home == "land" {
        "on land"
    } else {
        "in water"
    }
}

/// The user's private context: `my animal is the <name> . it is <colour> , <size> , and lives
/// <on land|in water> .`
pub fn user_context(item: &Item) -> String {
    format!(
        "my animal is the {} . it is {} , {} , and lives {} .",
        item.name,
        item.colour,
        item.size,
        home_phrase(item.home)
    )
}

/// The animal a [`user_context`] describes; `None` unless `ctx` (whitespace collapsed) is exactly
/// the context of a catalogue animal, so a context whose attributes contradict its name is
/// rejected.
pub fn item_from_context(ctx: &str) -> Option<&'static Item> {
    let words: Vec<&str> = ctx.split_whitespace().collect();
    let item = match words.as_slice() {
        ["my", "animal", "is", "the", name, ..] => by_name(name)?,
        _ => return None,
    };
    (words.join(" ") == user_context(item)).then_some(item)
}

/// The 11 questions the user understands, in a fixed order: the three `what`/`where` questions,
/// `is it <colour> ?` for each colour, `is it <size> ?` for each size, then `does it live on land
/// ?` and `does it live in water ?`.
pub fn questions() -> Vec<String> {
    let mut q = vec![
        "what colour is it ?".to_string(),
        "what size is it ?".to_string(),
        "where does it live ?".to_string(),
    ];
    q.extend(COLOURS.iter().chain(&SIZES).map(|w| format!("is it {w} ?")));
    q.extend(
        HOMES
            .iter()
            .map(|h| format!("does it live {} ?", home_phrase(h))),
    );
    q
}

/// The assistant message that guesses `item`: `is it the <name> ?`.
pub fn guess(item: &Item) -> String {
    format!("is it the {} ?", item.name)
}

fn yes_no(b: bool) -> String {
    if b { "yes ." } else { "no ." }.to_string()
}

/// The scripted user's reply to one assistant message, and whether it is the winning reply (a
/// right guess).
pub fn reply(item: &Item, assistant_message: &str) -> (String, bool) {
    let words: Vec<&str> = assistant_message.split_whitespace().collect();
    let text = match words.as_slice() {
        ["what", "colour", "is", "it", "?"] => format!("it is {} .", item.colour),
        ["what", "size", "is", "it", "?"] => format!("it is {} .", item.size),
        ["where", "does", "it", "live", "?"] => format!("it lives {} .", home_phrase(item.home)),
        ["is", "it", w, "?"] if COLOURS.contains(w) => yes_no(item.colour == *w),
        ["is", "it", w, "?"] if SIZES.contains(w) => yes_no(item.size == *w),
        ["does", "it", "live", "on", "land", "?"] => yes_no(item.home == "land"),
        ["does", "it", "live", "in", "water", "?"] => yes_no(item.home == "water"),
        ["is", "it", "the", name, "?"] if by_name(name).is_some() => {
            if *name == item.name {
                return (format!("yes ! it is the {name} ."), true);
            }
            format!("no , it is not the {name} .")
        }
        _ => NOT_UNDERSTOOD.to_string(),
    };
    (text, false)
}

/// Whether a user reply is the winning one: its first two words are `yes !`.
pub fn is_success_reply(reply: &str) -> bool {
    let mut words = reply.split_whitespace();
    words.next() == Some("yes") && words.next() == Some("!")
}

/// Gold of a conversation (opening included): 1 if any user message [`is_success_reply`], minus
/// [`TURN_COST`] per assistant message.
pub fn gold(messages: &[Message]) -> f64 {
    let won = messages
        .iter()
        .any(|m| m.role == "user" && is_success_reply(&m.content));
    let turns = messages.iter().filter(|m| m.role == "assistant").count();
    let win = if won { 1.0 } else { 0.0 };
    win - TURN_COST * turns as f64
}

/// A logged game: the user's private context and the conversation (opening first).
#[derive(Debug, Clone, PartialEq)]
pub struct Log {
    pub user_context: String,
    pub messages: Vec<Message>,
}

/// How many logs and held-out games [`DialogueTask`] generates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DialogueSize {
    pub logs: usize,
    pub eval_logs: usize,
    pub eval_games: usize,
}

impl Default for DialogueSize {
    fn default() -> Self {
        DialogueSize {
            logs: 2000,
            eval_logs: 200,
            eval_games: 200,
        }
    }
}

/// The task's data for one seed. Training logs, held-out logs and held-out games come from three
/// separate random streams derived from the seed, so changing one size leaves the others' data
/// unchanged.
pub struct DialogueTask {
    logs: Vec<Log>,
    eval_logs: Vec<Log>,
    eval_contexts: Vec<String>,
}

impl DialogueTask {
    pub fn new(seed: u64, size: DialogueSize) -> Self {
        let mut master = StdRng::seed_from_u64(seed ^ 0xd1a1_0000_0000_0004);
        let mut streams: Vec<StdRng> = (0..3)
            .map(|_| StdRng::seed_from_u64(master.random()))
            .collect();
        let play = |rng: &mut StdRng, n: usize| -> Vec<Log> {
            (0..n)
                .map(|_| {
                    let item = &CATALOGUE[rng.random_range(0..CATALOGUE.len())];
                    scripted_game(item, rng)
                })
                .collect()
        };
        let logs = play(&mut streams[0], size.logs);
        let eval_logs = play(&mut streams[1], size.eval_logs);
        let mut order: Vec<usize> = (0..CATALOGUE.len()).collect();
        order.shuffle(&mut streams[2]);
        let eval_contexts = (0..size.eval_games)
            .map(|g| user_context(&CATALOGUE[order[g % order.len()]]))
            .collect();
        DialogueTask {
            logs,
            eval_logs,
            eval_contexts,
        }
    }

    /// Training logs of the mediocre scripted assistant (hidden animal uniform over the catalogue).
    pub fn logs(&self) -> &[Log] {
        &self.logs
    }

    /// Held-out logs (a separate random stream) for the user model's held-out NLL and answer
    /// accuracy.
    pub fn eval_logs(&self) -> &[Log] {
        &self.eval_logs
    }

    /// Held-out games: the user contexts of `eval_games` games, the hidden animal cycling through
    /// the catalogue in a seeded shuffled order, so every animal appears equally often (±1).
    pub fn eval_contexts(&self) -> &[String] {
        &self.eval_contexts
    }
}

/// Play one game of the mediocre scripted assistant (see the module docs) against the scripted
/// user holding `item`.
pub fn scripted_game(item: &Item, rng: &mut StdRng) -> Log {
    let questions = questions();
    let mut messages = vec![Message::new("user", OPENING)];
    let mut candidates: Vec<&'static Item> = CATALOGUE.iter().collect();
    for _ in 0..TURN_LIMIT {
        let u: f64 = rng.random();
        let message = if u < ASK_PROBABILITY {
            questions[rng.random_range(0..questions.len())].clone()
        } else if u < ASK_PROBABILITY + CONSISTENT_GUESS_PROBABILITY {
            guess(candidates[rng.random_range(0..candidates.len())])
        } else {
            guess(&CATALOGUE[rng.random_range(0..CATALOGUE.len())])
        };
        let (answer, won) = reply(item, &message);
        // An animal stays a candidate if it would have given the same answer: this applies every
        // question's answer and rules out a wrongly guessed animal. The hidden one always stays.
        candidates.retain(|c| reply(c, &message).0 == answer);
        messages.push(Message::new("assistant", message));
        messages.push(Message::new("user", answer));
        if won {
            break;
        }
    }
    Log {
        user_context: user_context(item),
        messages,
    }
}

/// Every word the task can produce, plus the chat-template words `user`, `assistant`, `system`,
/// `:`; sorted and without duplicates.
pub fn vocabulary() -> Vec<String> {
    let mut messages = questions();
    messages.extend(CATALOGUE.iter().map(guess));
    let mut texts = vec![
        OPENING.to_string(),
        NOT_UNDERSTOOD.to_string(),
        "user assistant system :".to_string(),
    ];
    for item in &CATALOGUE {
        texts.push(user_context(item));
        texts.extend(messages.iter().map(|m| reply(item, m).0));
    }
    texts.extend(messages);
    let words: BTreeSet<String> = texts
        .iter()
        .flat_map(|t| t.split_whitespace())
        .map(str::to_string)
        .collect();
    words.into_iter().collect()
}

/// A Jinja chat template for [`tokenizer`]: `<role> : <content> </s>` per message, turns joined by
/// single spaces, and `assistant :` as the generation prompt. Rendered text has no leading or
/// trailing whitespace, so it round-trips through the tokenizer exactly:
/// `user : guess my animal . </s> assistant : what size is it ? </s> user : it is big . </s>`.
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{{ message['role'] }} : {{ message['content'] }} </s>{{ ' ' if not loop.last or add_generation_prompt else '' }}{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}";

/// The task's word-level tokenizer: `<pad> <s> </s> <unk>` with ids 0..=3, then [`vocabulary`] in
/// sorted order; built as [`testbed_tokenizer`](super::testbed_tokenizer) is.
pub fn tokenizer() -> rlhf_lm::Tokenizer {
    rlhf_lm::Tokenizer::from_tokenizers(
        word_level_tokenizer(vocabulary()),
        Some(BOS.to_string()),
        Some(EOS.to_string()),
        Some(PAD.to_string()),
    )
    .expect("the dialogue tokenizer names tokens in its vocabulary")
}

/// Write logs as TRL conversational JSONL: one line per log, `{"messages": [{"role", "content"},
/// ...], "user_context": "..."}`.
pub fn write_logs(path: &Path, logs: &[Log]) -> std::io::Result<()> {
    write_jsonl(
        path,
        logs.iter().map(|l| {
            json!({
                "messages": l.messages.iter()
                    .map(|m| json!({"role": m.role, "content": m.content}))
                    .collect::<Vec<_>>(),
                "user_context": l.user_context,
            })
        }),
    )
}
