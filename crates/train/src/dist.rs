//! Data parallelism across processes: every rank holds a replica of the model, works on its share
//! of each batch, and the ranks' gradients are summed before every optimiser step, so the replicas
//! take the same step and stay identical.
//!
//! Processes are started by MPI (`mpirun -n 2 rlhf sft ...`, or `srun` under Slurm), which also
//! carries the few collective operations a run needs: a sum of gradients (all-reduce), a gather of
//! rollout samples and metrics, a broadcast of the resume point, a barrier. Built without the `mpi`
//! feature (the default) every process is a world of one and nothing here communicates; started by
//! a launcher as one of several ranks, such a build refuses to run (the ranks would otherwise each
//! train alone and overwrite each other's run directory).
//!
//! What a caller does with it:
//! - [`World::share`]: this rank's contiguous share of a batch. A loss over a share is weighted by
//!   the share's size over the whole batch's, so the ranks' parts add up to the batch's loss.
//! - `GradAccumulator::finish_across_ranks` (in `clip`) sums the ranks' gradients.
//! - [`World::is_root`]: rank 0 alone writes the run directory (metrics, checkpoints, models).

use std::collections::HashSet;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::{Result, TrainError};

/// This process's place among the processes of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct World {
    rank: usize,
    size: usize,
}

static WORLD: OnceLock<World> = OnceLock::new();

#[cfg(feature = "mpi")]
static UNIVERSE: Mutex<Option<mpi::environment::Universe>> = Mutex::new(None);

/// Keys of metrics received from other ranks that this rank never logged itself, kept for the
/// life of the process (a metric's name is a `&'static str` throughout the toolkit; the set of
/// names is small and fixed by the code).
static INTERNED: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);

/// Largest piece of a collective on numbers (MPI counts are 32-bit; pieces also bound the
/// temporary buffers).
const PIECE: usize = 1 << 26;

/// The size and rank a launcher (Open MPI's mpirun, MPICH's hydra, Slurm's srun) gave this
/// process, if one started it.
fn launched_as() -> Option<(usize, usize)> {
    let var = |names: &[&str]| -> Option<usize> {
        names
            .iter()
            .find_map(|n| std::env::var(n).ok().and_then(|v| v.trim().parse().ok()))
    };
    // Slurm: the job step's task count (set by srun only; a batch script's own step has 1).
    let size = var(&[
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_SIZE",
        "SLURM_STEP_NUM_TASKS",
    ])?;
    let rank = var(&[
        "OMPI_COMM_WORLD_RANK",
        "PMI_RANK",
        "PMIX_RANK",
        "SLURM_PROCID",
    ])
    .unwrap_or(0);
    Some((size, rank))
}

/// Processes a launcher started on this node (to share its cores among them), if known.
pub fn local_ranks() -> Option<usize> {
    [
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "MPI_LOCALNRANKS",
        "SLURM_NTASKS_PER_NODE",
    ]
    .iter()
    .find_map(|n| std::env::var(n).ok().and_then(|v| v.trim().parse().ok()))
    .filter(|&n: &usize| n >= 1)
}

/// This process's index among the ranks a launcher started on its node, if known (to pick a
/// GPU per rank).
pub fn local_rank() -> Option<usize> {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
    ]
    .iter()
    .find_map(|n| std::env::var(n).ok().and_then(|v| v.trim().parse().ok()))
}

/// Join the run's processes: MPI is initialised when a launcher started this process (and the
/// binary was built with the `mpi` feature); otherwise this process is a world of one. Call once,
/// early; later calls return the same world.
pub fn init() -> Result<World> {
    if let Some(w) = WORLD.get() {
        return Ok(*w);
    }
    let world = match launched_as() {
        None | Some((0 | 1, _)) => World { rank: 0, size: 1 },
        Some((size, rank)) => start_mpi(size, rank)?,
    };
    Ok(*WORLD.get_or_init(|| world))
}

#[cfg(not(feature = "mpi"))]
fn start_mpi(size: usize, rank: usize) -> Result<World> {
    Err(TrainError::invalid(format!(
        "started as rank {rank} of {size} processes (by mpirun or srun), but this binary was built \
         without MPI: rebuild with `cargo build --release --features mpi` (needs an MPI library and \
         libclang), or run a single process"
    )))
}

#[cfg(feature = "mpi")]
fn start_mpi(size: usize, rank: usize) -> Result<World> {
    use mpi::traits::Communicator;
    // Only the main thread calls MPI; the compute threads never do.
    let (universe, _level) = mpi::initialize_with_threading(mpi::Threading::Funneled)
        .ok_or_else(|| TrainError::invalid("MPI was initialised twice"))?;
    let comm = universe.world();
    let world = World {
        rank: comm.rank() as usize,
        size: comm.size() as usize,
    };
    if world.size != size || world.rank != rank {
        return Err(TrainError::invalid(format!(
            "MPI says rank {} of {}, the launcher's environment rank {rank} of {size}",
            world.rank, world.size
        )));
    }
    *UNIVERSE.lock().expect("not poisoned") = Some(universe);
    Ok(world)
}

/// The world this process belongs to ([`init`]'s, or a world of one when `init` was not called).
pub fn world() -> World {
    WORLD.get().copied().unwrap_or(World { rank: 0, size: 1 })
}

/// Leave MPI cleanly (every rank, at the end of a successful run): this rank's scratch
/// directory ([`scratch_dir`]) is removed. Nothing else without MPI.
pub fn finalize() {
    if world().size() > 1 {
        let _ = std::fs::remove_dir_all(scratch_root());
    }
    #[cfg(feature = "mpi")]
    drop(UNIVERSE.lock().expect("not poisoned").take());
}

/// Where this rank's files go: `<tmp>/rlhf-rank<r>-<pid>`.
fn scratch_root() -> PathBuf {
    std::env::temp_dir().join(format!(
        "rlhf-rank{}-{}",
        world().rank(),
        std::process::id()
    ))
}

/// A fresh directory of this rank's own, for what a rank other than 0 would otherwise write into
/// the run directory that rank 0 writes (`tag` names it: `run`, `value`, ...). It lives until
/// [`finalize`], so a model a replica saved there can be read back later in the run.
pub fn scratch_dir(tag: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    scratch_root().join(format!("{tag}-{n}"))
}

/// End every rank of the run now (a rank that failed: the others would wait for it forever in
/// their next collective). Returns only in a world of one.
pub fn abort_all(code: i32) {
    #[cfg(feature = "mpi")]
    if world().size > 1 {
        use mpi::traits::Communicator;
        mpi::topology::SimpleCommunicator::world().abort(code);
    }
    let _ = code;
}

impl World {
    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Rank 0: the one that writes the run directory and prints.
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// This rank's share of `n` items: contiguous, in rank order, sizes differing by at most one
    /// (the first `n % size` ranks take one more).
    pub fn share(&self, n: usize) -> Range<usize> {
        share_of(n, self.rank, self.size)
    }

    /// This rank's share of `n` rows cut into batches of `batch` rows, in whole batches: the index
    /// of its first batch and its rows. A batch is the unit whose numbers must not depend on the
    /// number of ranks (a generation batch's random stream, a scoring batch's padding).
    pub fn batch_share(&self, n: usize, batch: usize) -> (usize, Range<usize>) {
        let batch = batch.max(1);
        let batches = self.share(n.div_ceil(batch));
        let rows = (batches.start * batch).min(n)..(batches.end * batch).min(n);
        (batches.start, rows)
    }

    /// Element-wise sum over every rank of `values`, in place (MPI's all-reduce). MPI
    /// implementations give every rank the same result for a commutative sum (Open MPI's ring
    /// and recursive-doubling algorithms both do); that the replicas stay equal is also checked
    /// at every checkpoint ([`World::same_everywhere`]).
    pub fn sum_f32(&self, values: &mut [f32]) -> Result<()> {
        self.sum(values)
    }

    /// [`World::sum_f32`] for f64.
    pub fn sum_f64(&self, values: &mut [f64]) -> Result<()> {
        self.sum(values)
    }

    fn sum<T: Summable>(&self, values: &mut [T]) -> Result<()> {
        if self.size == 1 {
            return Ok(());
        }
        for piece in values.chunks_mut(PIECE) {
            all_reduce_sum(piece)?;
        }
        Ok(())
    }

    /// Whether every rank holds the same `digest` (of its replica's weights, say). Returns the
    /// ranks whose digest differs from rank 0's.
    pub fn same_everywhere(&self, digest: u64) -> Result<Vec<usize>> {
        let all: Vec<u64> = self.gather_json(&digest)?;
        Ok(all
            .iter()
            .enumerate()
            .filter(|(_, d)| **d != all[0])
            .map(|(r, _)| r)
            .collect())
    }

    /// Whether `flag` holds on any rank.
    pub fn any(&self, flag: bool) -> Result<bool> {
        let mut v = [flag as u8 as f64];
        self.sum_f64(&mut v)?;
        Ok(v[0] > 0.0)
    }

    /// Every rank's `bytes`, in rank order.
    pub fn gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        if self.size == 1 {
            return Ok(vec![bytes.to_vec()]);
        }
        all_gather_bytes(bytes, self.size)
    }

    /// Rank 0's `bytes` on every rank (what other ranks pass is ignored).
    pub fn broadcast_bytes(&self, bytes: Vec<u8>) -> Result<Vec<u8>> {
        if self.size == 1 {
            return Ok(bytes);
        }
        broadcast_from_root(bytes, self.rank)
    }

    /// Every rank's value, in rank order, through JSON.
    pub fn gather_json<T: serde::Serialize + serde::de::DeserializeOwned>(
        &self,
        value: &T,
    ) -> Result<Vec<T>> {
        if self.size == 1 {
            let v = serde_json::to_value(value).map_err(|e| TrainError::invalid(e.to_string()))?;
            return serde_json::from_value(v)
                .map(|v| vec![v])
                .map_err(|e| TrainError::invalid(e.to_string()));
        }
        let mine = serde_json::to_vec(value).map_err(|e| TrainError::invalid(e.to_string()))?;
        self.gather_bytes(&mine)?
            .iter()
            .enumerate()
            .map(|(r, b)| {
                serde_json::from_slice(b).map_err(|e| {
                    TrainError::invalid(format!(
                        "data gathered from rank {r} does not read back: {e}"
                    ))
                })
            })
            .collect()
    }

    /// Rank 0's value on every rank, through JSON.
    pub fn broadcast_json<T: serde::Serialize + serde::de::DeserializeOwned>(
        &self,
        value: &T,
    ) -> Result<T> {
        let bytes = if self.is_root() {
            serde_json::to_vec(value).map_err(|e| TrainError::invalid(e.to_string()))?
        } else {
            Vec::new()
        };
        let bytes = self.broadcast_bytes(bytes)?;
        serde_json::from_slice(&bytes).map_err(|e| {
            TrainError::invalid(format!("data broadcast by rank 0 does not read back: {e}"))
        })
    }

    /// Metrics summed over the ranks, key by key (a key some rank did not report counts as 0
    /// there), in the order the keys first appear in rank order.
    pub fn sum_metrics(
        &self,
        metrics: Vec<(&'static str, f64)>,
    ) -> Result<Vec<(&'static str, f64)>> {
        if self.size == 1 {
            return Ok(metrics);
        }
        let mine: Vec<(String, f64)> = metrics.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let all: Vec<Vec<(String, f64)>> = self.gather_json(&mine)?;
        let mut out: Vec<(&'static str, f64)> = Vec::new();
        for (k, v) in all.into_iter().flatten() {
            match out.iter_mut().find(|(n, _)| *n == k) {
                Some((_, s)) => *s += v,
                None => {
                    let key = metrics
                        .iter()
                        .map(|(n, _)| *n)
                        .find(|n| *n == k)
                        .unwrap_or_else(|| intern(k));
                    out.push((key, v));
                }
            }
        }
        Ok(out)
    }

    /// Wait until every rank gets here.
    pub fn barrier(&self) {
        #[cfg(feature = "mpi")]
        if self.size > 1 {
            use mpi::traits::CommunicatorCollectives;
            mpi::topology::SimpleCommunicator::world().barrier();
        }
    }
}

/// Gradients on GPUs are summed by NCCL (`--features nccl`): the communicator's unique id is made
/// on rank 0 and broadcast over MPI, then every rank's GPU joins it. Built and type-checked here;
/// it has not yet run on GPUs (docs/scale-out.md, "The CUDA build").
#[cfg(feature = "nccl")]
pub mod nccl {
    use std::cell::RefCell;

    use candle_core::cuda_backend::cudarc::nccl::{Comm, Id, ReduceOp};
    use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice};
    use candle_core::{bail, CpuStorage, CustomOp1, Layout, Shape, Tensor};

    thread_local! {
        /// The communicator of this rank's GPU (made on first use, on the thread that calls MPI).
        static COMM: RefCell<Option<Comm>> = const { RefCell::new(None) };
    }

    /// The element-wise sum over every rank of `t`, an f32 tensor on this rank's CUDA device
    /// (the same shape on every rank).
    pub fn sum(t: &Tensor) -> candle_core::Result<Tensor> {
        t.contiguous()?.apply_op1_no_bwd(&AllReduceSum)
    }

    struct AllReduceSum;

    impl CustomOp1 for AllReduceSum {
        fn name(&self) -> &'static str {
            "nccl-all-reduce-sum"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            bail!("NCCL sums GPU tensors; CPU tensors are summed over MPI")
        }

        fn cuda_fwd(
            &self,
            storage: &CudaStorage,
            layout: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let CudaStorageSlice::F32(all) = &storage.slice else {
                bail!("NCCL sum: f32 gradients only");
            };
            let Some((from, to)) = layout.contiguous_offsets() else {
                bail!("NCCL sum: the tensor is not contiguous");
            };
            let device = storage.device.clone();
            let send = all.slice(from..to);
            let mut recv = device.alloc_zeros::<f32>(to - from)?;
            COMM.with(|cell| -> candle_core::Result<()> {
                let mut cell = cell.borrow_mut();
                if cell.is_none() {
                    *cell = Some(join(&device)?);
                }
                let comm = cell.as_ref().expect("set above");
                comm.all_reduce(&send, &mut recv, &ReduceOp::Sum)
                    .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
                Ok(())
            })?;
            Ok((
                CudaStorage::wrap_cuda_slice(recv, device),
                layout.shape().clone(),
            ))
        }
    }

    /// This rank's NCCL communicator: rank 0's unique id, sent to every rank over MPI.
    fn join(device: &candle_core::cuda_backend::CudaDevice) -> candle_core::Result<Comm> {
        let world = super::world();
        let err = |e: crate::TrainError| candle_core::Error::Msg(e.to_string());
        let id_bytes: Vec<u8> = if world.is_root() {
            let id = Id::new().map_err(|e| candle_core::Error::Msg(format!("NCCL id: {e:?}")))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        let id_bytes = world.broadcast_bytes(id_bytes).map_err(err)?;
        let mut internal = [0 as std::ffi::c_char; 128];
        if id_bytes.len() != internal.len() {
            bail!(
                "NCCL id: {} bytes from rank 0, expected 128",
                id_bytes.len()
            );
        }
        for (c, b) in internal.iter_mut().zip(&id_bytes) {
            *c = *b as std::ffi::c_char;
        }
        Comm::from_rank(
            device.cuda_stream(),
            world.rank(),
            world.size(),
            Id::uninit(internal),
        )
        .map_err(|e| candle_core::Error::Msg(format!("NCCL communicator: {e:?}")))
    }
}

/// Rank `rank`'s share of `n` items among `size` ranks (see [`World::share`]).
pub fn share_of(n: usize, rank: usize, size: usize) -> Range<usize> {
    let size = size.max(1);
    let (base, extra) = (n / size, n % size);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

fn intern(key: String) -> &'static str {
    let mut set = INTERNED.lock().expect("not poisoned");
    let set = set.get_or_insert_with(HashSet::new);
    if let Some(k) = set.get(key.as_str()) {
        return k;
    }
    let leaked: &'static str = Box::leak(key.into_boxed_str());
    set.insert(leaked);
    leaked
}

/// The numbers [`World::sum_f32`] and [`World::sum_f64`] add up.
#[cfg(feature = "mpi")]
trait Summable: mpi::datatype::Equivalence + Copy + Default {}
#[cfg(not(feature = "mpi"))]
trait Summable: Copy + Default {}
impl Summable for f32 {}
impl Summable for f64 {}

#[cfg(feature = "mpi")]
fn all_reduce_sum<T: Summable>(piece: &mut [T]) -> Result<()> {
    use mpi::collective::SystemOperation;
    use mpi::traits::CommunicatorCollectives;
    let comm = mpi::topology::SimpleCommunicator::world();
    let mut sum = vec![T::default(); piece.len()];
    comm.all_reduce_into(&*piece, &mut sum[..], SystemOperation::sum());
    piece.copy_from_slice(&sum);
    Ok(())
}

#[cfg(not(feature = "mpi"))]
fn all_reduce_sum<T: Summable>(_piece: &mut [T]) -> Result<()> {
    Err(TrainError::invalid("no MPI in this build"))
}

#[cfg(feature = "mpi")]
fn all_gather_bytes(bytes: &[u8], size: usize) -> Result<Vec<Vec<u8>>> {
    use mpi::datatype::PartitionMut;
    use mpi::traits::CommunicatorCollectives;
    let comm = mpi::topology::SimpleCommunicator::world();
    let len = i32::try_from(bytes.len())
        .map_err(|_| TrainError::invalid("more than 2 GiB to gather from one rank"))?;
    let mut counts = vec![0i32; size];
    comm.all_gather_into(&len, &mut counts[..]);
    let displs: Vec<i32> = counts
        .iter()
        .scan(0i32, |at, &c| {
            let d = *at;
            *at += c;
            Some(d)
        })
        .collect();
    let total: usize = counts.iter().map(|&c| c as usize).sum();
    let mut all = vec![0u8; total];
    {
        let mut part = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
        comm.all_gather_varcount_into(bytes, &mut part);
    }
    Ok(counts
        .iter()
        .zip(&displs)
        .map(|(&c, &d)| all[d as usize..(d + c) as usize].to_vec())
        .collect())
}

#[cfg(not(feature = "mpi"))]
fn all_gather_bytes(_bytes: &[u8], _size: usize) -> Result<Vec<Vec<u8>>> {
    Err(TrainError::invalid("no MPI in this build"))
}

#[cfg(feature = "mpi")]
fn broadcast_from_root(mut bytes: Vec<u8>, rank: usize) -> Result<Vec<u8>> {
    use mpi::traits::{Communicator, Root};
    let comm = mpi::topology::SimpleCommunicator::world();
    let root = comm.process_at_rank(0);
    let mut len = bytes.len() as u64;
    root.broadcast_into(&mut len);
    if rank != 0 {
        bytes = vec![0u8; len as usize];
    }
    for piece in bytes.chunks_mut(PIECE) {
        root.broadcast_into(piece);
    }
    Ok(bytes)
}

#[cfg(not(feature = "mpi"))]
fn broadcast_from_root(_bytes: Vec<u8>, _rank: usize) -> Result<Vec<u8>> {
    Err(TrainError::invalid("no MPI in this build"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_the_batch_in_order_and_differ_by_at_most_one() {
        for n in 0..20 {
            for size in 1..6 {
                let shares: Vec<Range<usize>> = (0..size).map(|r| share_of(n, r, size)).collect();
                let mut next = 0;
                for s in &shares {
                    assert_eq!(s.start, next, "n={n} size={size}: {shares:?}");
                    next = s.end;
                }
                assert_eq!(next, n);
                let lens: Vec<usize> = shares.iter().map(|s| s.len()).collect();
                let (lo, hi) = (lens.iter().min().unwrap(), lens.iter().max().unwrap());
                assert!(hi - lo <= 1, "n={n} size={size}: {lens:?}");
            }
        }
        assert_eq!(share_of(10, 0, 3), 0..4);
        assert_eq!(share_of(10, 1, 3), 4..7);
        assert_eq!(share_of(10, 2, 3), 7..10);
        assert_eq!(share_of(1, 1, 2), 1..1);
        // 10 rows in batches of 4 (4, 4, 2) over 2 ranks: batches 0-1 and batch 2.
        let (r0, r1) = (World { rank: 0, size: 2 }, World { rank: 1, size: 2 });
        assert_eq!(r0.batch_share(10, 4), (0, 0..8));
        assert_eq!(r1.batch_share(10, 4), (2, 8..10));
        assert_eq!(r1.batch_share(3, 4), (1, 3..3));
    }

    #[test]
    fn a_world_of_one_passes_everything_through() {
        let w = World { rank: 0, size: 1 };
        let mut v = [1.5f32, -2.0];
        w.sum_f32(&mut v).unwrap();
        assert_eq!(v, [1.5, -2.0]);
        assert!(w.any(true).unwrap());
        assert!(!w.any(false).unwrap());
        assert_eq!(w.gather_bytes(b"ab").unwrap(), vec![b"ab".to_vec()]);
        assert_eq!(w.broadcast_json(&vec![3u32]).unwrap(), vec![3u32]);
        let m = w.sum_metrics(vec![("loss", 0.5), ("acc", 1.0)]).unwrap();
        assert_eq!(m, vec![("loss", 0.5), ("acc", 1.0)]);
        assert_eq!(w.share(5), 0..5);
    }

    #[test]
    fn unknown_metric_names_are_interned_once() {
        let a = intern("some/metric".to_string());
        let b = intern("some/metric".to_string());
        assert!(std::ptr::eq(a, b));
    }
}
