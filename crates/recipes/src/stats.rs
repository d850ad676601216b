//! The statistics the comparison tables use: Student-t intervals over seeds, the paired t-test
//! between two methods run on the same seeds, and Holm's correction when many pairs are tested
//! at once.

/// Two-sided 97.5% Student-t quantile for `df` degrees of freedom.
pub fn t975(df: usize) -> f64 {
    const T: [f64; 10] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    ];
    if df == 0 {
        f64::NAN
    } else if df <= 10 {
        T[df - 1]
    } else {
        1.96 + 2.5 / df as f64
    }
}

/// Mean and Student-t 95% half-width over seeds (NaN half-width for one seed).
pub fn mean_ci(xs: &[f64]) -> (f64, f64) {
    let n = xs.len();
    let mean = xs.iter().sum::<f64>() / n.max(1) as f64;
    if n < 2 {
        return (mean, f64::NAN);
    }
    let sd = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
    (mean, t975(n - 1) * sd / (n as f64).sqrt())
}

/// P(|T| >= t) for Student's t with `df` (integer) degrees of freedom: the closed forms for
/// integer df (Abramowitz & Stegun 26.7.3-4) in theta = atan(t / sqrt(df)).
pub fn t_two_sided_p(t: f64, df: usize) -> f64 {
    if df == 0 || t.is_nan() {
        return f64::NAN;
    }
    let t = t.abs();
    if t.is_infinite() {
        return 0.0;
    }
    let theta = (t / (df as f64).sqrt()).atan();
    let (s, c) = theta.sin_cos();
    let c2 = c * c;
    // A = P(|T| < t).
    let a = if df % 2 == 1 {
        // 2/pi (theta + sin cos (1 + 2/3 c^2 + 2*4/(3*5) c^4 + ... up to c^(df-3))).
        let mut sum = 0.0;
        if df > 1 {
            let mut term = 1.0;
            sum = 1.0;
            let mut k = 2;
            while k < df - 1 {
                term *= k as f64 / (k + 1) as f64 * c2;
                sum += term;
                k += 2;
            }
        }
        2.0 / std::f64::consts::PI * (theta + s * c * sum)
    } else {
        // sin (1 + 1/2 c^2 + 1*3/(2*4) c^4 + ... up to c^(df-2)).
        let mut term = 1.0;
        let mut sum = 1.0;
        let mut k = 1;
        while k < df - 1 {
            term *= k as f64 / (k + 1) as f64 * c2;
            sum += term;
            k += 2;
        }
        s * sum
    };
    (1.0 - a).clamp(0.0, 1.0)
}

/// The paired t-test of `a - b` over the same seeds.
#[derive(
    Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
pub struct PairedTest {
    pub n: usize,
    /// Mean difference a - b.
    pub diff: f64,
    /// Student-t 95% interval of the mean difference.
    pub ci95: [f64; 2],
    /// t statistic (NaN when every difference is the same, or with one pair).
    pub t: f64,
    /// Two-sided p-value (1 when every difference is zero; NaN with n < 2 or when the
    /// differences are identical and non-zero).
    pub p: f64,
}

pub fn paired_t(a: &[f64], b: &[f64]) -> PairedTest {
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let n = d.len();
    let (diff, half) = mean_ci(&d);
    if n < 2 {
        return PairedTest {
            n,
            diff,
            ci95: [f64::NAN; 2],
            t: f64::NAN,
            p: f64::NAN,
        };
    }
    let sd = (d.iter().map(|x| (x - diff).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
    let se = sd / (n as f64).sqrt();
    let (t, p) = if se > 0.0 {
        let t = diff / se;
        (t, t_two_sided_p(t, n - 1))
    } else if diff == 0.0 {
        (f64::NAN, 1.0)
    } else {
        // Every seed differs by the same amount: the t statistic is undefined (0 / 0 variance),
        // and with a handful of seeds on a grid of win-rates (multiples of 1/(2n)) that happens
        // by coincidence, so no p-value is claimed.
        (f64::NAN, f64::NAN)
    };
    PairedTest {
        n,
        diff,
        ci95: [diff - half, diff + half],
        t,
        p,
    }
}

/// The paired t-test of `a - b` over the seeds both have, each side given as (seed, value).
pub fn paired_by_seed(a: &[(u64, f64)], b: &[(u64, f64)]) -> PairedTest {
    let (xs, ys): (Vec<f64>, Vec<f64>) = a
        .iter()
        .filter_map(|&(seed, x)| Some((x, b.iter().find(|r| r.0 == seed)?.1)))
        .unzip();
    paired_t(&xs, &ys)
}

/// Holm's step-down adjustment of `p` (same order out as in): the family-wise error stays below
/// the level when every adjusted p below it is called significant. NaN p-values stay NaN and do
/// not count as tests.
pub fn holm(p: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..p.len()).filter(|&i| !p[i].is_nan()).collect();
    order.sort_by(|&i, &j| p[i].total_cmp(&p[j]));
    let m = order.len();
    let mut out = vec![f64::NAN; p.len()];
    let mut running = 0.0f64;
    for (rank, &i) in order.iter().enumerate() {
        running = running.max(((m - rank) as f64 * p[i]).min(1.0));
        out[i] = running;
    }
    out
}
