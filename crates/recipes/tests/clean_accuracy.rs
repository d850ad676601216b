//! The quickstart's clean reward-model accuracy, on hand-made numbers.

use rlhf_recipes::quickstart::clean_accuracy;

/// Four pairs: gold prefers a, ties, prefers b, prefers a; the reward model prefers a, a, b, b.
/// The tie has no right answer and is left out: right on pairs 1 and 3, wrong on 4 -> 2/3, one
/// tie excluded (counting the tie as right would give 3/4).
#[test]
fn gold_ties_are_excluded_from_the_clean_accuracy() {
    let gold = [(1.0, 0.0), (0.5, 0.5), (0.2, 0.7), (0.3, 0.1)];
    let scores = [(2.0, 1.0), (3.0, 1.0), (0.0, 1.0), (0.0, 1.0)];
    let c = clean_accuracy(&gold, &scores).unwrap();
    assert_eq!((c.pairs, c.ties_excluded), (3, 1));
    assert!((c.accuracy - 2.0 / 3.0).abs() < 1e-12, "{c:?}");
    // A reward-model tie is not a correct ranking.
    let c = clean_accuracy(&[(1.0, 0.0)], &[(0.4, 0.4)]).unwrap();
    assert_eq!((c.accuracy, c.pairs, c.ties_excluded), (0.0, 1, 0));
    // Only ties: nothing to judge.
    let c = clean_accuracy(&[(0.5, 0.5)], &[(1.0, 0.0)]).unwrap();
    assert!(c.accuracy.is_nan() && c.pairs == 0 && c.ties_excluded == 1);
    // Mismatched lengths are an error, not a panic.
    let err = clean_accuracy(&gold, &scores[..2]).unwrap_err().to_string();
    assert!(err.contains("4 gold pairs but 2 scored"), "{err}");
}
