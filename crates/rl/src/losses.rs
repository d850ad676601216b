//! Small numerically stable pieces shared by the loss functions.

use candle_core::Tensor;
use rlhf_train::Result;

/// -log(sigmoid(x)) = softplus(-x), computed as max(-x, 0) + log(1 + exp(-|x|)).
pub fn neg_log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let relu_neg = x.neg()?.relu()?;
    let log_term = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok((relu_neg + log_term)?)
}
