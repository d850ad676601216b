//! The built-in testbed: determinism, the tokenizer, gold rewards, annotators, files.

use std::collections::HashSet;
use std::path::PathBuf;

use rlhf_data::jsonl;
use rlhf_data::testbed::{
    arithmetic, chrf, task_by_name, task_by_name_sized, testbed_tokenizer, tokenizer_for,
    translate, vocabulary, write_task_files, Annotator, SentimentTask, Task, TaskSize,
    SPECIAL_TOKENS, TASK_NAMES,
};

const REVIEW: &str = "review : the acting in this film was";

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

fn demo_mean(task: &dyn Task) -> f64 {
    let d = task.demonstrations();
    d.iter().map(|(p, r)| task.gold(p, r)).sum::<f64>() / d.len() as f64
}

#[test]
fn sizes_and_splits() {
    for name in TASK_NAMES {
        let t = task_by_name(name, 7).unwrap();
        assert_eq!(t.name(), *name);
        assert_eq!(t.train_prompts().len(), 2000, "{name}");
        assert_eq!(t.eval_prompts().len(), 200, "{name}");
        assert_eq!(t.demonstrations().len(), 2000, "{name}");
        let eval: HashSet<&String> = t.eval_prompts().iter().collect();
        assert_eq!(eval.len(), 200, "{name}: eval prompts are distinct");
        assert!(
            t.train_prompts().iter().all(|p| !eval.contains(p)),
            "{name}: train and eval overlap"
        );
        assert!(
            t.demonstrations().iter().all(|(p, _)| !eval.contains(p)),
            "{name}: a demo uses an eval prompt"
        );
        let train: HashSet<&String> = t.train_prompts().iter().collect();
        assert!(
            train.len() > 500,
            "{name}: only {} distinct train prompts",
            train.len()
        );
        for (p, r) in t.demonstrations() {
            assert!(p.split(' ').count() <= 12, "{name}: long prompt `{p}`");
            let n = r.split(' ').count();
            assert!(
                n <= 16 && n <= t.max_response_words(),
                "{name}: long response `{r}`"
            );
            assert!(
                !r.contains("</s>") && !r.contains("<s>"),
                "{name}: special token in `{r}`"
            );
            for text in [p, r] {
                assert_eq!(
                    text.split_whitespace().collect::<Vec<_>>().join(" "),
                    *text,
                    "{name}: spacing of `{text}`"
                );
            }
        }
    }
    let small = TaskSize {
        train_prompts: 10,
        eval_prompts: 5,
        demonstrations: 25,
    };
    let t = task_by_name_sized("translate", 1, small).unwrap();
    assert_eq!(
        (
            t.train_prompts().len(),
            t.eval_prompts().len(),
            t.demonstrations().len()
        ),
        (10, 5, 25)
    );
    let err = task_by_name("poetry", 1).err().expect("unknown task");
    assert!(err.contains("poetry") && err.contains("sentiment"), "{err}");
}

#[test]
fn deterministic_from_seed() {
    for name in TASK_NAMES {
        let a = task_by_name(name, 42).unwrap();
        let b = task_by_name(name, 42).unwrap();
        let c = task_by_name(name, 43).unwrap();
        assert_eq!(a.train_prompts(), b.train_prompts(), "{name}");
        assert_eq!(a.eval_prompts(), b.eval_prompts(), "{name}");
        assert_eq!(a.demonstrations(), b.demonstrations(), "{name}");
        assert_ne!(a.train_prompts(), c.train_prompts(), "{name}");
        assert_ne!(a.eval_prompts(), c.eval_prompts(), "{name}");
        assert_ne!(a.demonstrations(), c.demonstrations(), "{name}");
    }
}

#[test]
fn tokenizer_covers_every_task_text() {
    let tok = testbed_tokenizer();
    for (id, t) in SPECIAL_TOKENS.iter().enumerate() {
        assert_eq!(tok.token_to_id(t), Some(id as u32));
        assert!(tok.is_special(id as u32), "{t} is special");
    }
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(tok.eos_token_id(), Some(2));
    assert_eq!(tok.pad_token_id, Some(0));
    assert!(tok.add_bos && !tok.add_eos);
    let words = vocabulary();
    assert!(
        words.windows(2).all(|w| w[0] < w[1]),
        "vocabulary sorted and distinct"
    );
    assert_eq!(tok.vocab_size(), words.len() + 4);
    assert!(tok.vocab_size() < 400, "vocab {}", tok.vocab_size());
    for (i, w) in words.iter().enumerate() {
        assert_eq!(tok.token_to_id(w), Some(i as u32 + 4), "{w}");
    }
    let unk = tok.token_to_id("<unk>").unwrap();
    assert_eq!(
        tok.encode("zebra", false).unwrap(),
        vec![unk],
        "unknown words map to <unk>"
    );

    for seed in [0, 1] {
        for name in TASK_NAMES {
            let task = task_by_name(name, seed).unwrap();
            let tok = tokenizer_for(task.as_ref());
            let texts = task
                .demonstrations()
                .iter()
                .flat_map(|(p, r)| [p, r])
                .chain(task.eval_prompts())
                .chain(task.train_prompts());
            for text in texts {
                let ids = tok.encode(text, false).unwrap();
                assert_eq!(
                    ids.len(),
                    text.split(' ').count(),
                    "{name}: one id per word in `{text}`"
                );
                assert!(!ids.contains(&unk), "{name}: <unk> in `{text}`");
                assert_eq!(
                    tok.decode(&ids, false).unwrap(),
                    *text,
                    "{name}: round trip"
                );
                let with = tok.encode(text, true).unwrap();
                assert_eq!(with[0], 1);
                assert_eq!(&with[1..], &ids[..]);
                assert_eq!(tok.decode(&with, true).unwrap(), *text);
            }
        }
    }
}

#[test]
fn sentiment_gold_orders_hand_written_responses() {
    let task = SentimentTask::new(3, TaskSize::default());
    let g = |r: &str| task.gold(REVIEW, r);
    let positive = g("wonderful and brilliant , and i loved it .");
    let mild_positive = g("great .");
    let neutral = g("quiet , and it was long .");
    let mild_negative = g("dull .");
    let negative = g("terrible and awful , and i hated it .");
    assert!(
        positive > mild_positive && mild_positive > neutral,
        "{positive} {mild_positive} {neutral}"
    );
    assert!(
        neutral > mild_negative && mild_negative > negative,
        "{neutral} {mild_negative} {negative}"
    );
    assert!(close(neutral, 0.0));
    assert!(positive > 1.5 && negative < -1.5, "{positive} {negative}");
    assert!(
        close(g("not bad ."), -g("not good .")),
        "negation is symmetric"
    );
    assert!(g("not bad .") > 0.0 && g("really great .") > g("great ."));

    let mean = demo_mean(&task);
    assert!(
        mean.abs() < 0.5,
        "demonstrations should be middling, mean {mean}"
    );
    for degenerate in [
        "great great great great",
        "great great great great .",
        "",
        ".",
    ] {
        assert!(
            g(degenerate) < mean,
            "`{degenerate}` scores {} >= demo mean {mean}",
            g(degenerate)
        );
    }
    assert!(g("great great great great") < -2.0);
    // A bigram-valid but ungrammatical chain of positive words: worse than the fluent version.
    assert!(g("great , and fun , and superb .") < g("great and fun , and i loved it .") - 0.5);
    let parts = task.gold_parts(REVIEW, "great great great great");
    assert!(parts.sentiment > 1.5 && parts.fluency < -5.0, "{parts:?}");
    // A first word that cannot follow the prompt.
    assert!(g("it was great .") < g("great ."));

    // Length: nothing up to the cap, then a penalty per word.
    let long = "really wonderful and truly brilliant , because the soundtrack was really great .";
    assert_eq!(long.split(' ').count(), 13);
    assert_eq!(task.gold_parts(REVIEW, long).length, 0.0);
    assert!(task.gold_parts(REVIEW, long).fluency == 0.0);
    let longer = format!("{long} and it was great and really fun and superb .");
    let p = task.gold_parts(REVIEW, &longer);
    assert!(
        close(p.length, -0.3 * (longer.split(' ').count() - 14) as f64),
        "{p:?}"
    );
    assert!(g(&longer) < g(long));

    // Every demonstration is grammatical: fluency penalties come only from repeated words.
    let mut signs = [0usize; 3];
    for (p, r) in task.demonstrations() {
        let parts = task.gold_parts(p, r);
        let repeats = -parts.fluency / 0.75;
        assert!(
            close(repeats, repeats.round()) && repeats < 3.0,
            "`{r}`: {parts:?}"
        );
        let class = if parts.sentiment > 1e-9 {
            2
        } else if parts.sentiment < -1e-9 {
            0
        } else {
            1
        };
        signs[class] += 1;
    }
    let n = task.demonstrations().len() as f64;
    println!("demonstrations by sentiment (negative, neutral, positive): {signs:?}");
    assert!(
        signs.iter().all(|&c| c as f64 > 0.15 * n),
        "sentiment balance {signs:?}"
    );
}

#[test]
fn arithmetic_gold_exact_values() {
    let task = task_by_name("arithmetic", 0).unwrap();
    let add = "compute : 1 2 + 7 =";
    let mul = "compute : 1 2 * 9 =";
    let cases = [
        (add, "1 9", 1.0),
        (add, "1 8", 0.25),
        (add, "2 8", 0.0),
        (add, "1", 0.25),
        (add, "9", 0.0),
        (add, "", 0.0),
        (add, "1 9 9", 0.4),
        (add, "1 9 0 0 0 0 0 0 0", 0.0),
        (add, "+ + + =", -0.2),
        (mul, "1 0 8", 1.0),
        (mul, "1 0 7", 1.0 / 3.0),
        (mul, "1 8", 1.0 / 6.0),
        ("compute : 0 + 0 =", "0", 1.0),
        ("compute : 9 9 + 9 9 =", "1 9 8", 1.0),
        ("what is 2 + 2", "4", 0.0),
    ];
    for (p, r, want) in cases {
        assert!(
            close(task.gold(p, r), want),
            "{p} -> `{r}`: {} != {want}",
            task.gold(p, r)
        );
    }
    assert_eq!(task.reference(add).as_deref(), Some("1 9"));
    assert_eq!(
        arithmetic::answer(mul),
        Some(vec!["1".to_string(), "0".to_string(), "8".to_string()])
    );

    // Demonstrations: about 60% exact, the others exactly one digit off.
    let mut exact = 0;
    for (p, r) in task.demonstrations() {
        let answer = task.reference(p).unwrap();
        assert_eq!(
            r.split(' ').count(),
            answer.split(' ').count(),
            "{p} -> {r}"
        );
        let wrong = r
            .split(' ')
            .zip(answer.split(' '))
            .filter(|(a, b)| a != b)
            .count();
        assert!(wrong <= 1, "{p} -> {r}");
        exact += (wrong == 0) as usize;
    }
    let frac = exact as f64 / task.demonstrations().len() as f64;
    assert!((0.55..0.65).contains(&frac), "{frac}");
}

#[test]
fn chrf_hand_computed() {
    assert!(close(chrf("kado vidas .", "kado vidas ."), 1.0));
    assert!(close(chrf("abc", "xyz"), 0.0));
    assert!(close(chrf("", "abc"), 0.0));
    assert!(close(chrf("a b c", "abc"), 1.0), "whitespace is ignored");
    // hyp "ab", ref "abc": n=1 P=1 R=2/3; n=2 P=1 R=1/2; n=3 P=0 R=0 (hyp has no 3-grams).
    // P = 2/3, R = 7/18, F2 = 5PR / (4P + R) = 14/33.
    assert!(
        close(chrf("ab", "abc"), 14.0 / 33.0),
        "{}",
        chrf("ab", "abc")
    );
    // hyp "abc", ref "ab": n=1 P=2/3 R=1; n=2 P=1/2 R=1. P = 7/12, R = 1, F2 = 35/40.
    assert!(close(chrf("abc", "ab"), 0.875), "{}", chrf("abc", "ab"));
    // Repeated n-grams are clipped: hyp "aaaa", ref "a": n=1 only, P=1/4, R=1, F2 = (5/4)/2.
    assert!(close(chrf("aaaa", "a"), 0.625));
}

#[test]
fn translate_reference_and_gold() {
    let task = task_by_name("translate", 5).unwrap();
    let cases = [
        (
            "translate : the big dogs see an apple .",
            "los kado ne grando una pama vidan .",
        ),
        (
            "translate : a happy girl likes some red boats .",
            "una nena fela unos nafo ne roso amas .",
        ),
        (
            "translate : the cats carry the old book .",
            "las mira ne lo libo veko portan .",
        ),
    ];
    for (p, want) in cases {
        assert_eq!(translate::reference(p).as_deref(), Some(want), "{p}");
        assert!(close(task.gold(p, want), 1.0));
    }
    let (p, reference) = cases[0];
    // Source order and a missing plural marker score lower; unrelated text scores 0.
    let unordered = task.gold(p, "los kado ne grando vidan una pama .");
    let no_marker = task.gold(p, "los kado grando una pama vidan .");
    assert!(unordered < 1.0 && no_marker < 1.0 && unordered > 0.5 && no_marker > 0.5);
    assert!(close(task.gold(p, "1 2 3"), 0.0));
    assert!(close(task.gold("translate : gibberish", reference), 0.0));
    for p in task.eval_prompts() {
        assert!(task.reference(p).is_some(), "{p}");
    }
    let mean = demo_mean(task.as_ref());
    assert!((0.5..0.9).contains(&mean), "demo mean chrF {mean}");
    let perfect = task
        .demonstrations()
        .iter()
        .filter(|(p, r)| close(task.gold(p, r), 1.0))
        .count();
    assert!(
        perfect < task.demonstrations().len() / 4,
        "{perfect} perfect demonstrations"
    );
}

#[test]
fn annotator_follows_gold_with_noise() {
    let task = SentimentTask::new(0, TaskSize::default());
    let good = "wonderful and brilliant , and i loved it .";
    let bad = "great great great great";
    assert!(task.gold(REVIEW, good) - task.gold(REVIEW, bad) > 4.0);
    let agreement = |noise: f64, seed: u64| -> f64 {
        let mut a = Annotator::new(noise, seed);
        a.temperature = 0.1;
        let n = 10_000;
        let agree = (0..n)
            .filter(|i| {
                // Alternate the order so that a bias toward either position would show.
                if i % 2 == 0 {
                    a.prefer(&task, REVIEW, good, bad)
                } else {
                    !a.prefer(&task, REVIEW, bad, good)
                }
            })
            .count();
        agree as f64 / n as f64
    };
    assert_eq!(agreement(0.0, 1), 1.0);
    let quarter = agreement(0.25, 2);
    assert!((quarter - 0.75).abs() < 0.02, "{quarter}");
    let half = agreement(0.5, 3);
    assert!((half - 0.5).abs() < 0.02, "{half}");

    // Bradley-Terry itself: a gold gap of 1 at temperature 1 wins sigmoid(1) = 0.731 of the time.
    let mut a = Annotator::new(0.0, 4);
    assert_eq!(a.temperature, 1.0);
    assert!(close(a.p_prefer(1.0, 0.0), 1.0 / (1.0 + (-1.0f64).exp())));
    let wins = (0..10_000).filter(|_| a.prefer_gold(1.0, 0.0)).count() as f64 / 10_000.0;
    assert!((wins - 0.731).abs() < 0.02, "{wins}");

    // Same seed, same labels; the task temperature is picked up by `for_task`.
    let labels = |seed| {
        let mut a = Annotator::new(0.25, seed);
        (0..200)
            .map(|_| a.prefer(&task, REVIEW, "great .", "dull ."))
            .collect::<Vec<_>>()
    };
    assert_eq!(labels(9), labels(9));
    assert_ne!(labels(9), labels(10));
    let arith = task_by_name("arithmetic", 0).unwrap();
    assert_eq!(
        Annotator::for_task(arith.as_ref(), 0.25, 0).temperature,
        arith.annotator_temperature()
    );
    assert_eq!(Annotator::new(0.25, 0).noise, Annotator::DEFAULT_NOISE);
}

#[test]
fn task_files_read_back() {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("rlhf-testbed-files-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for name in TASK_NAMES {
        let task = task_by_name(name, 11).unwrap();
        let files = write_task_files(task.as_ref(), &dir.join(name)).unwrap();
        let sft = jsonl::read(&files.sft).unwrap();
        assert_eq!(sft.len(), task.demonstrations().len());
        for (line, (p, r)) in sft.iter().zip(task.demonstrations()) {
            assert_eq!(line.string("prompt").unwrap(), *p);
            let completion = line.string("completion").unwrap();
            assert_eq!(
                completion,
                format!(" {r}"),
                "TRL convention: prompt + completion is the text"
            );
            assert_eq!(
                format!("{p}{completion}").split(' ').count(),
                p.split(' ').count() + r.split(' ').count()
            );
        }
        for (path, prompts) in [
            (&files.prompts_train, task.train_prompts()),
            (&files.prompts_eval, task.eval_prompts()),
        ] {
            let lines = jsonl::read(path).unwrap();
            let read: Vec<String> = lines.iter().map(|l| l.string("prompt").unwrap()).collect();
            assert_eq!(read, prompts);
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Prints the gold of demonstrations and of degenerate responses (`--nocapture` to see it), and
/// checks that every degenerate response is worse than the average demonstration.
#[test]
fn report_gold_of_demonstrations_and_degenerate_responses() {
    let degenerate: &[(&str, &[&str])] = &[
        (
            "sentiment",
            &[
                "great great great great",
                "great great great great .",
                "",
                ".",
                "great ,",
                "wonderful wonderful",
            ],
        ),
        ("arithmetic", &["", "1 1 1 1 1 1", "0", "= = ="]),
        (
            "translate",
            &["", "kado kado kado kado", ".", "lo lo lo lo lo lo"],
        ),
    ];
    for (name, responses) in degenerate {
        let task = task_by_name(name, 0).unwrap();
        let mean = demo_mean(task.as_ref());
        println!(
            "{name}: mean gold of {} demonstrations = {mean:.3}",
            task.demonstrations().len()
        );
        for r in *responses {
            let prompts = task.eval_prompts();
            let g = prompts.iter().map(|p| task.gold(p, r)).sum::<f64>() / prompts.len() as f64;
            println!("  {r:?}: mean gold over eval prompts = {g:.3}");
            assert!(
                g < mean,
                "{name}: `{r}` ({g}) is not below the demonstrations ({mean})"
            );
        }
        if *name == "translate" {
            // Copying the source sentence.
            let prompts = task.eval_prompts();
            let g = prompts
                .iter()
                .map(|p| task.gold(p, p.trim_start_matches("translate : ")))
                .sum::<f64>()
                / prompts.len() as f64;
            println!("  (copy of the source): mean gold = {g:.3}");
            assert!(g < mean);
        }
        if let Some(reference) = task.eval_prompts().first().and_then(|p| task.reference(p)) {
            println!("  reference for the first eval prompt: {reference:?}");
        }
    }
}

#[test]
fn tokenizer_survives_save_and_load() {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("rlhf-testbed-tok-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let tok = testbed_tokenizer();
    tok.save_hf(&dir, None).unwrap();
    let back = rlhf_lm::Tokenizer::from_hf_dir(&dir).unwrap();
    assert_eq!(back.vocab_size(), tok.vocab_size());
    assert_eq!((back.add_bos, back.add_eos), (tok.add_bos, tok.add_eos));
    assert_eq!(back.eos_token_id(), Some(2));
    assert_eq!(back.pad_token_id, Some(0));
    for name in TASK_NAMES {
        let task = task_by_name(name, 2).unwrap();
        for (p, r) in task.demonstrations().iter().take(50) {
            for text in [p, r] {
                let ids = tok.encode(text, true).unwrap();
                assert_eq!(back.encode(text, true).unwrap(), ids);
                assert_eq!(back.decode(&ids, true).unwrap(), *text);
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
