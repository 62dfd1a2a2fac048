//! The CUDA backend's host-side arithmetic, checked without a GPU (every build): which device a
//! rank uses, the shared-memory budget of a launch, CUDA's grid limits, and where the training
//! forward uploads its targets.

use zhllama::backend::cuda::device_for_local_rank;
use zhllama::backend::cuda::kernels::{
    GRID_YZ_MAX, SMEM_DEFAULT_LIMIT, check_grid, dynamic_smem_plan,
};

#[test]
fn local_rank_maps_onto_the_visible_devices() {
    // (local rank, visible devices, device): a node with every GPU visible, one GPU per rank
    // (Slurm --gpus-per-task=1, a container per rank: rank 1 sees only its own GPU, ordinal 0),
    // and more ranks than GPUs (round-robin).
    for (rank, visible, want) in [
        (0, 8, 0),
        (1, 8, 1),
        (7, 8, 7),
        (0, 1, 0),
        (1, 1, 0),
        (5, 1, 0),
        (2, 2, 0),
        (3, 2, 1),
    ] {
        assert_eq!(
            device_for_local_rank(rank, visible).unwrap(),
            want,
            "local rank {rank}, {visible} visible"
        );
    }
    let e = device_for_local_rank(1, 0).unwrap_err().to_string();
    assert!(e.contains("no CUDA device visible to local rank 1"), "{e}");
}

#[test]
fn shared_memory_counts_static_and_dynamic_bytes() {
    // attention_cached_forward_v1: 128 B of static scratch (32 floats) plus 4 B per cached position.
    let static_ = 128;
    let h200_optin = 227 * 1024;
    let dynamic = |positions: usize| positions * 4;
    // 12256 positions: 49024 + 128 = 49152 B, exactly the default limit: no opt-in.
    assert_eq!(
        dynamic_smem_plan("k", dynamic(12256), static_, h200_optin).unwrap(),
        None
    );
    // 12288 positions fit 48 KiB of dynamic memory alone but not with the static 128 B: the launch
    // must opt in (without it the launch fails on the device).
    assert_eq!(
        dynamic_smem_plan("k", dynamic(12288), static_, h200_optin).unwrap(),
        Some(dynamic(12288))
    );
    assert!(dynamic(12288) + static_ > SMEM_DEFAULT_LIMIT);
    // Longer contexts use the opt-in limit, up to (227 KiB − 128 B) / 4 = 58080 positions.
    assert_eq!(
        dynamic_smem_plan("k", dynamic(58080), static_, h200_optin).unwrap(),
        Some(dynamic(58080))
    );
    let e = dynamic_smem_plan(
        "attention_cached_forward_v1_bf16",
        dynamic(58081),
        static_,
        h200_optin,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("attention_cached_forward_v1_bf16")
            && e.contains("232324 B of dynamic + 128 B of static"),
        "{e}"
    );
}

#[test]
fn grids_beyond_cuda_limits_are_refused() {
    assert!(check_grid("k", (1, 1, 1)).is_ok());
    assert!(check_grid("k", (i32::MAX as usize, GRID_YZ_MAX, GRID_YZ_MAX)).is_ok());
    // Attention puts b·h in gridDim.y: 32 heads × 2048 sequences = 65536.
    let e = check_grid("attention_forward_v1_d128_bf16", (4, 32 * 2048, 1))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("attention_forward_v1_d128_bf16") && e.contains("(4, 65536, 1)"),
        "{e}"
    );
    assert!(check_grid("k", (1, 1, GRID_YZ_MAX + 1)).is_err());
    assert!(check_grid("k", (i32::MAX as usize + 1, 1, 1)).is_err());
    assert!(check_grid("k", (0, 1, 1)).is_err());
}

/// The training forward must upload its targets before the layers: an upload synchronizes the
/// stream, so one between the layers and the lm_head makes the host wait for the whole forward
/// before it can queue the loss. Checked on the source of `Llama::forward` (the order of calls
/// is not observable through a backend's results).
#[test]
fn training_forward_uploads_targets_before_the_layers() {
    let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/model/llama.rs"))
        .unwrap();
    let start = src
        .find("pub fn forward(&self, acts: &mut Activations<B>")
        .expect("Llama::forward not found");
    let body = &src[start..];
    let body = &body[..body.find("\n    }\n").expect("end of Llama::forward")];
    let upload = body
        .find("upload_ids(&mut acts.targets")
        .expect("Llama::forward no longer uploads its targets");
    let layers = body
        .find("self.forward_hidden(")
        .expect("Llama::forward no longer runs forward_hidden");
    assert!(
        upload < layers,
        "Llama::forward uploads the targets after the layers"
    );
}
