//! Small numerically stable pieces shared by the loss functions.

use candle_core::Tensor;
use rlhf_train::Result;

/// softplus(x) = log(1 + exp(x)), stable in both tails, with the exact gradient sigmoid(x)
/// everywhere, 0 included.
///
/// The textbook stable form max(x, 0) + log(1 + exp(-|x|)) is right in value, but under automatic
/// differentiation `max` and `|x|` each take a one-sided derivative at exactly 0, and their kinks
/// no longer cancel: candle gives 1 there instead of sigmoid(0) = 1/2. Exactly 0 is common, not a
/// corner case: at DPO's first step the policy is the reference, so every pair's logit is 0 when
/// the reference log-probs were computed in the same batches. Here each side of 0 is its own smooth
/// branch, fed only inputs of its own sign (0 on the other side), so neither overflows and the
/// unused branch's gradient is an exact 0.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    let zeros = x.zeros_like()?;
    let negative = x.lt(&zeros)?;
    let below = negative.where_cond(x, &zeros)?; // x < 0: x, else 0
    let above = negative.where_cond(&zeros, x)?; // x >= 0: x, else 0
    let low = (below.exp()? + 1.0)?.log()?; // log(1 + e^x)
    let high = (&above + (above.neg()?.exp()? + 1.0)?.log()?)?; // x + log(1 + e^-x)
    Ok(negative.where_cond(&low, &high)?)
}

/// -log(sigmoid(x)) = softplus(-x).
pub fn neg_log_sigmoid(x: &Tensor) -> Result<Tensor> {
    softplus(&x.neg()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn value_and_grad(f: fn(&Tensor) -> Result<Tensor>, xs: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let x = Var::new(xs, &Device::Cpu).unwrap();
        let y = f(x.as_tensor()).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        (
            y.to_vec1().unwrap(),
            g.get(x.as_tensor()).unwrap().to_vec1().unwrap(),
        )
    }

    #[test]
    fn softplus_values_and_gradients_match_the_closed_forms_including_at_zero() {
        let xs = [
            -800.0, -30.0, -2.0, -1e-12, 0.0, 1e-12, 0.5, 3.0, 40.0, 800.0,
        ];
        let (v, g) = value_and_grad(softplus, &xs);
        for ((x, v), g) in xs.iter().zip(&v).zip(&g) {
            let want = if *x > 30.0 { *x } else { x.exp().ln_1p() };
            let sigmoid = 1.0 / (1.0 + (-x).exp());
            assert!(
                (v - want).abs() <= 1e-12 * (1.0 + want.abs()),
                "softplus({x}) = {v}, want {want}"
            );
            assert!(
                (g - sigmoid).abs() <= 1e-12,
                "softplus'({x}) = {g}, want {sigmoid}"
            );
            assert!(v.is_finite() && g.is_finite());
        }
        // At 0 exactly: log 2 and 1/2 (the old max + |x| form gave a gradient of 1 here).
        assert_eq!(v[4], 2f64.ln());
        assert_eq!(g[4], 0.5);
    }

    #[test]
    fn neg_log_sigmoid_gradient_matches_finite_differences() {
        let xs = [-5.0, -0.3, 0.0, 0.7, 6.0];
        let (_, g) = value_and_grad(neg_log_sigmoid, &xs);
        let f = |x: f64| (-x).exp().ln_1p();
        for (x, g) in xs.iter().zip(&g) {
            let h = 1e-6;
            let fd = (f(x + h) - f(x - h)) / (2.0 * h);
            assert!((g - fd).abs() < 1e-8, "at {x}: {g} vs {fd}");
        }
        assert_eq!(g[2], -0.5);
    }
}
