//! RLP-UML's multi-view information bottleneck (Lang et al. 2024, after Federici et al. 2020): two
//! policy responses y1, y2 to the same prompt x are two views of it; each view's representation is
//! encoded into a diagonal Gaussian, and the loss keeps what the two views share while dropping
//! what only one of them has:
//!
//! ```text
//! h_i       = the reward model's final-norm hidden state at the last token of (x, y_i)
//! μ_i, s_i  = MLP_μ(h_i), MLP_s(h_i)                 (3 layers each, tanh between; s = log σ²)
//! z_i       = μ_i + exp(s_i / 2) ⊙ ε_i,  ε_i ~ N(0, I) (reparameterised, seeded)
//! T(a, b)   = aᵀ W b                                  (bilinear critic, W initialised to I / √k)
//!           or cos(a, b) / τ                          (cosine critic, `Critic::Cosine`)
//! Î_JS      = mean_i [−softplus(−T(z1_i, z2_i))] − mean_{i≠j} [softplus(T(z1_i, z2_j))]
//! D_SKL     = ½ [KL(p1‖p2) + KL(p2‖p1)]
//!           = ¼ Σ_k [ (σ1² + (μ1−μ2)²)/σ2² + (σ2² + (μ1−μ2)²)/σ1² − 2 ]   (closed form)
//! L_M       = −Î_JS + mean_i D_SKL(p(z|v1_i) ‖ p(z|v2_i))
//! ```
//!
//! Negatives z2_j (j ≠ i) are the second views of the other prompts of the same micro-batch; a
//! micro-batch with one view pair has no negative term. Choices where the paper is silent: the
//! hidden state is the one the scalar reward head reads (last real token, after the final norm);
//! the reward head keeps reading h, not z (the bottleneck shapes the trunk through the encoder's
//! gradients, and the refreshed model stays an ordinary reward model); z is sampled in the MI term
//! and the SKL uses the closed form of the two posteriors; the critic is bilinear by default.
//!
//! The cosine critic exists because the bilinear one admits a trivial optimum: z constant (every
//! posterior the same, D_SKL = 0) and W -> 0 give Î_JS = −2 ln 2, the estimator's value at zero
//! scores, with no gradient left. With a bounded, scale-free critic a constant z scores every
//! pair 1/τ, which costs more than telling prompts apart, so collapse is penalised.
//!
//! The heads are extra tensors (`mib.*`) stored beside the reward model's weights while it trains,
//! so the optimiser, checkpoints and `--resume` treat them like any other parameter; [`strip`]
//! removes them before the refreshed reward model is saved.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, D};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rlhf_train::{Result, TrainError};

/// Name prefix of the encoder heads and the critic.
pub const PREFIX: &str = "mib.";
pub const CRITIC: &str = "mib.critic.weight";

/// Sizes of the encoder heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadShape {
    /// The reward model's hidden size (the heads' input).
    pub input: usize,
    /// Width of the two hidden layers of each MLP.
    pub width: usize,
    /// Dimension of z.
    pub z_dim: usize,
}

fn uniform(rng: &mut StdRng, n: usize, bound: f64) -> Vec<f32> {
    (0..n)
        .map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32)
        .collect()
}

/// Add freshly initialised heads (PyTorch's default uniform ±1/√fan_in for weights, zero biases)
/// and the critic (I/√k) to a weight map; deterministic in `seed`.
pub fn add_heads(
    weights: &mut HashMap<String, Tensor>,
    shape: HeadShape,
    seed: u64,
    device: &Device,
) -> Result<()> {
    if shape.input == 0 || shape.width == 0 || shape.z_dim == 0 {
        return Err(TrainError::invalid("MIB heads: sizes must be >= 1"));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let dims = [
        (shape.input, shape.width),
        (shape.width, shape.width),
        (shape.width, shape.z_dim),
    ];
    for head in ["mu", "logvar"] {
        for (l, &(fan_in, out)) in dims.iter().enumerate() {
            let w = uniform(&mut rng, out * fan_in, 1.0 / (fan_in as f64).sqrt());
            weights.insert(
                format!("{PREFIX}{head}.{l}.weight"),
                Tensor::from_vec(w, (out, fan_in), device)?,
            );
            weights.insert(
                format!("{PREFIX}{head}.{l}.bias"),
                Tensor::zeros(out, DType::F32, device)?,
            );
        }
    }
    let k = shape.z_dim;
    let scale = 1.0 / (k as f64).sqrt();
    weights.insert(
        CRITIC.into(),
        (Tensor::eye(k, DType::F32, device)? * scale)?,
    );
    Ok(())
}

/// The weight map without the MIB tensors (what the refreshed reward model saves).
pub fn strip(weights: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    weights
        .iter()
        .filter(|(n, _)| !n.starts_with(PREFIX))
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect()
}

/// Whether a weight map holds the MIB heads.
pub fn has_heads(weights: &HashMap<String, Tensor>) -> bool {
    weights.contains_key(CRITIC)
}

/// How the critic scores a pair of codes.
#[derive(
    Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Critic {
    /// aᵀ W b with the trainable `mib.critic.weight`.
    Bilinear,
    /// cos(a, b) / temperature (W unused).
    Cosine { temperature: f64 },
}

/// The two Gaussian encoder MLPs and the bilinear critic (trainable when built from `Var`s).
pub struct GaussianHeads {
    mu: Vec<(Tensor, Tensor)>,
    logvar: Vec<(Tensor, Tensor)>,
    /// (k, k).
    pub critic: Tensor,
}

fn get(w: &HashMap<String, Tensor>, name: &str) -> Result<Tensor> {
    w.get(name)
        .cloned()
        .ok_or_else(|| TrainError::invalid(format!("MIB heads: no `{name}` tensor")))
}

impl GaussianHeads {
    pub fn from_weights(w: &HashMap<String, Tensor>) -> Result<Self> {
        let layers = |head: &str| -> Result<Vec<(Tensor, Tensor)>> {
            (0..3)
                .map(|l| {
                    Ok((
                        get(w, &format!("{PREFIX}{head}.{l}.weight"))?,
                        get(w, &format!("{PREFIX}{head}.{l}.bias"))?,
                    ))
                })
                .collect()
        };
        Ok(GaussianHeads {
            mu: layers("mu")?,
            logvar: layers("logvar")?,
            critic: get(w, CRITIC)?,
        })
    }

    fn mlp(layers: &[(Tensor, Tensor)], x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for (l, (w, b)) in layers.iter().enumerate() {
            x = x.matmul(&w.t()?)?.broadcast_add(b)?;
            if l + 1 < layers.len() {
                x = x.tanh()?;
            }
        }
        Ok(x)
    }

    /// (μ, log σ²) of p(z | h) for hidden states h: (b, d) -> ((b, k), (b, k)).
    pub fn posterior(&self, h: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((Self::mlp(&self.mu, h)?, Self::mlp(&self.logvar, h)?))
    }

    /// Critic scores T(z1_i, z2_j) = z1_iᵀ W z2_j for every i, j: (b, b).
    pub fn scores(&self, z1: &Tensor, z2: &Tensor) -> Result<Tensor> {
        Ok(z1.matmul(&self.critic)?.matmul(&z2.t()?)?)
    }

    /// Critic scores under `critic` for every i, j: (b, b).
    pub fn scores_with(&self, critic: Critic, z1: &Tensor, z2: &Tensor) -> Result<Tensor> {
        match critic {
            Critic::Bilinear => self.scores(z1, z2),
            Critic::Cosine { temperature } => cosine_scores(z1, z2, temperature),
        }
    }
}

/// cos(z1_i, z2_j) / temperature for every i, j: (b, b). Differentiable (norms floored at 1e-6).
pub fn cosine_scores(z1: &Tensor, z2: &Tensor, temperature: f64) -> Result<Tensor> {
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(TrainError::invalid(
            "the cosine critic's temperature must be > 0",
        ));
    }
    let unit = |z: &Tensor| -> Result<Tensor> {
        let norm = (z.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?;
        Ok(z.broadcast_div(&norm)?)
    };
    Ok((unit(z1)?.matmul(&unit(z2)?.t()?)? / temperature)?)
}

impl GaussianHeads {}

/// softplus(x) = log(1 + exp(x)) (see [`crate::losses::softplus`]: exact gradient at 0 too).
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    crate::losses::softplus(x)
}

/// Closed-form symmetric KL ½[KL(p1‖p2) + KL(p2‖p1)] of diagonal Gaussians given by means and
/// log-variances, all (b, k): (b,).
pub fn symmetric_kl(mu1: &Tensor, lv1: &Tensor, mu2: &Tensor, lv2: &Tensor) -> Result<Tensor> {
    let d2 = (mu1 - mu2)?.sqr()?;
    let (v1, v2) = (lv1.exp()?, lv2.exp()?);
    let a = (&v1 + &d2)?.div(&v2)?;
    let b = (&v2 + &d2)?.div(&v1)?;
    Ok((((a + b)? - 2.0)?.sum(D::Minus1)? * 0.25)?)
}

/// The Jensen-Shannon MI estimate from a (b, b) critic matrix whose diagonal holds the positive
/// pairs: mean of −softplus(−T_ii) minus the mean of softplus(T_ij) over i ≠ j (no negative term
/// when b = 1). A scalar.
pub fn js_mi(scores: &Tensor) -> Result<Tensor> {
    let (b, b2) = scores.dims2()?;
    if b != b2 || b == 0 {
        return Err(TrainError::invalid(format!(
            "JS estimator: expected a square, non-empty critic matrix, got {b}x{b2}"
        )));
    }
    let eye = Tensor::eye(b, scores.dtype(), scores.device())?;
    let pos = (softplus(&scores.neg()?)? * &eye)?.sum_all()?.neg()? / b as f64;
    let pos = pos?;
    if b == 1 {
        return Ok(pos);
    }
    let off = (eye.ones_like()? - &eye)?;
    let neg = ((softplus(scores)? * off)?.sum_all()? / (b * (b - 1)) as f64)?;
    Ok((pos - neg)?)
}

/// Standard-normal noise (b, k), deterministic in `seed` (Box-Muller).
pub fn gaussian_noise(b: usize, k: usize, seed: u64, device: &Device) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..b * k)
        .map(|_| {
            let u1: f64 = rng.random::<f64>().max(1e-12);
            let u2: f64 = rng.random::<f64>();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
        })
        .collect();
    Ok(Tensor::from_vec(v, (b, k), device)?)
}

/// The MIB loss and its parts.
pub struct MibLoss {
    /// −Î_JS + mean D_SKL (a scalar tensor).
    pub loss: Tensor,
    pub mi: f64,
    pub skl: f64,
}

/// L_M for b view pairs: `h1`, `h2` (b, d) the two views' hidden states, `eps1`, `eps2` (b, k) the
/// reparameterisation noise.
pub fn mib_loss(
    heads: &GaussianHeads,
    critic: Critic,
    h1: &Tensor,
    h2: &Tensor,
    eps1: &Tensor,
    eps2: &Tensor,
) -> Result<MibLoss> {
    let (mu1, lv1) = heads.posterior(h1)?;
    let (mu2, lv2) = heads.posterior(h2)?;
    let z1 = (&mu1 + ((&lv1 * 0.5)?.exp()? * eps1)?)?;
    let z2 = (&mu2 + ((&lv2 * 0.5)?.exp()? * eps2)?)?;
    let mi = js_mi(&heads.scores_with(critic, &z1, &z2)?)?;
    let skl = symmetric_kl(&mu1, &lv1, &mu2, &lv2)?.mean_all()?;
    let scalar = |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
    Ok(MibLoss {
        mi: scalar(&mi)?,
        skl: scalar(&skl)?,
        loss: (skl - mi)?,
    })
}

/// Rows of `hidden` (b, t, d) at each row's `last` index (b,) u32: (b, d). Differentiable.
pub fn at_last_token(hidden: &Tensor, last: &Tensor) -> Result<Tensor> {
    let (b, _, d) = hidden.dims3()?;
    let idx = last
        .reshape((b, 1, 1))?
        .broadcast_as((b, 1, d))?
        .contiguous()?;
    Ok(hidden.gather(&idx, 1)?.squeeze(1)?)
}

/// Two responses of the policy to one prompt, as token ids (a UML training item).
#[derive(Debug, Clone, PartialEq)]
pub struct ViewPair {
    pub prompt: Vec<u32>,
    pub first: Vec<u32>,
    pub second: Vec<u32>,
}

/// RLP's reward-model loss (Eq. 1) for one micro-batch, as its two parts: the Bradley-Terry mean
/// over `pairs` (`None` without pairs) and the MIB loss over `views` (`None` without views). One
/// forward pass of the trunk serves both; the reward is the scalar head (`score.weight`) at the
/// last token, as in [`crate::reward`].
pub struct RlpParts {
    pub bt: Option<Tensor>,
    pub accuracy: f64,
    pub mib: Option<MibLoss>,
}

pub fn rlp_parts(
    lm: &crate::policy::TrainableLm,
    pairs: &[crate::pairs::PairIds],
    views: &[ViewPair],
    critic: Critic,
    noise_seed: u64,
    device: &Device,
) -> Result<RlpParts> {
    let (np, nv) = (pairs.len(), views.len());
    let rows: Vec<(Vec<u32>, Vec<u32>)> = pairs
        .iter()
        .map(|p| (p.prompt.clone(), p.chosen.clone()))
        .chain(pairs.iter().map(|p| (p.prompt.clone(), p.rejected.clone())))
        .chain(views.iter().map(|v| (v.prompt.clone(), v.first.clone())))
        .chain(views.iter().map(|v| (v.prompt.clone(), v.second.clone())))
        .collect();
    if rows.is_empty() {
        return Err(TrainError::invalid("RLP loss: an empty micro-batch"));
    }
    let batch = rlhf_lm::score::CompletionBatch::new(&rows, lm.pad_id, device)?;
    let model = lm.model(device)?;
    let tensors = lm.params.tensors();
    let tokens = &batch.tokens;
    let hidden = model.hidden_states(&tokens.ids, &tokens.positions, &tokens.mask, None)?;
    let h = at_last_token(&hidden, &crate::reward::last_token_index(tokens, device)?)?;
    let mut out = RlpParts {
        bt: None,
        accuracy: f64::NAN,
        mib: None,
    };
    if np > 0 {
        let w = get(&tensors, crate::reward::HEAD)?;
        let r = h.narrow(0, 0, 2 * np)?.matmul(&w.t()?)?.squeeze(1)?;
        let (rc, rr) = (r.narrow(0, 0, np)?, r.narrow(0, np, np)?);
        out.bt = Some(crate::losses::neg_log_sigmoid(&(&rc - &rr)?)?.mean_all()?);
        let (c, j) = (rc.to_vec1::<f32>()?, rr.to_vec1::<f32>()?);
        out.accuracy = c.iter().zip(&j).filter(|(a, b)| a > b).count() as f64 / np as f64;
    }
    if nv > 0 {
        let heads = GaussianHeads::from_weights(&tensors)?;
        let k = heads.critic.dim(0)?;
        let mut rng = StdRng::seed_from_u64(noise_seed);
        let (s1, s2) = (rng.random::<u64>(), rng.random::<u64>());
        out.mib = Some(mib_loss(
            &heads,
            critic,
            &h.narrow(0, 2 * np, nv)?,
            &h.narrow(0, 2 * np + nv, nv)?,
            &gaussian_noise(nv, k, s1, device)?,
            &gaussian_noise(nv, k, s2, device)?,
        )?);
    }
    Ok(out)
}
