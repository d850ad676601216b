//! The over-seeds statistics the ReST and RLP tables print, by hand.

use rlhf_recipes::compare::mean_ci;

#[test]
fn mean_and_student_t_half_width_over_seeds() {
    // mean 0.85, sample sd 0.05, t(0.975, 2 df) = 4.303: half-width 4.303 * 0.05 / sqrt(3)
    let (m, h) = mean_ci(&[0.8, 0.85, 0.9]);
    assert!((m - 0.85).abs() < 1e-12);
    assert!((h - 4.303 * 0.05 / 3f64.sqrt()).abs() < 1e-9, "{h}");
    // two seeds: t(0.975, 1 df) = 12.706, sd = |a - b| / sqrt(2)
    let (m, h) = mean_ci(&[0.2, 0.4]);
    assert!((m - 0.3).abs() < 1e-12);
    assert!(
        (h - 12.706 * (0.2 / 2f64.sqrt()) / 2f64.sqrt()).abs() < 1e-9,
        "{h}"
    );
    // one seed: no interval
    let (m, h) = mean_ci(&[0.7]);
    assert!(m == 0.7 && h.is_nan());
}
