//! Recipe presets (docs/RECIPE.md §3 tables), TOML and `--key value` overrides, and the HF warmup rule.

use zhllama::train::config::{Stage, TrainConfig};

#[test]
fn presets_reproduce_the_recipe_tables() {
    let pt1 = TrainConfig::preset(Stage::Pt1);
    let pt2 = TrainConfig::preset(Stage::Pt2);
    let sft = TrainConfig::preset(Stage::Sft);
    // batch size (sequences), initial LR, steps, max length
    assert_eq!(
        (
            pt1.batch_size,
            pt1.learning_rate,
            pt1.max_steps,
            pt1.max_length
        ),
        (1024, 2e-4, 3000, 512)
    );
    assert_eq!(
        (
            pt2.batch_size,
            pt2.learning_rate,
            pt2.max_steps,
            pt2.max_length
        ),
        (1024, 1e-4, 6000, 512)
    );
    assert_eq!(
        (sft.batch_size, sft.learning_rate, sft.max_length),
        (512, 1e-4, 512)
    );
    assert!((6000..=10000).contains(&sft.max_steps));
    // LoRA r8 / alpha 32 / dropout 0.05, targets and fully trained modules per stage
    assert!(pt1.lora_targets.is_empty());
    assert_eq!(pt1.modules_to_save, ["embed_tokens"]);
    assert_eq!(pt2.lora_targets, ["q_proj", "k_proj", "v_proj", "o_proj"]);
    assert_eq!(sft.lora_targets.len(), 7);
    for c in [&pt2, &sft] {
        assert_eq!((c.lora_rank, c.lora_alpha, c.lora_dropout), (8, 32.0, 0.05));
        assert_eq!(c.modules_to_save, ["embed_tokens", "lm_head"]);
    }
    // warmup ratio 0.05 / 0.03, weight decay 0.01 / 0, clipping 1.0
    assert_eq!(
        (pt1.warmup_ratio, pt2.warmup_ratio, sft.warmup_ratio),
        (0.05, 0.05, 0.03)
    );
    assert_eq!(
        (pt1.weight_decay, pt2.weight_decay, sft.weight_decay),
        (0.01, 0.01, 0.0)
    );
    assert_eq!(sft.max_grad_norm, 1.0);
    // batch = micro × accumulation × world
    assert_eq!(
        pt1.accumulation_steps(8).unwrap() * pt1.micro_batch_size * 8,
        1024
    );
    assert_eq!(
        sft.accumulation_steps(16).unwrap() * sft.micro_batch_size * 16,
        512
    );
    for c in [&pt1, &pt2, &sft] {
        c.validate().unwrap();
    }
}

#[test]
fn warmup_steps_round_up_like_hf() {
    // HF TrainingArguments.get_warmup_steps: math.ceil(num_training_steps * warmup_ratio).
    let mut c = TrainConfig::preset(Stage::Sft);
    c.max_steps = 10;
    assert_eq!(c.warmup(), 1); // ceil(0.3)
    c.max_steps = 6000;
    assert_eq!(c.warmup(), 180);
    c.max_steps = 101;
    assert_eq!(c.warmup(), 4); // ceil(3.03)
    c.warmup_steps = 7;
    assert_eq!(c.warmup(), 7);
}

#[test]
fn toml_file_then_flags_override_the_preset() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.toml");
    std::fs::write(
        &path,
        "learning_rate = 3e-4\nlora_rank = 16\nlora_targets = [\"q_proj\", \"v_proj\"]\nmax_steps = 10\n",
    )
    .unwrap();
    let mut c = TrainConfig::preset(Stage::Pt2);
    c.merge_toml_file(&path).unwrap();
    assert_eq!((c.learning_rate, c.lora_rank, c.max_steps), (3e-4, 16, 10));
    assert_eq!(c.lora_targets, ["q_proj", "v_proj"]);
    c.set("lora-rank", "4").unwrap();
    c.set("learning_rate", "1e-5").unwrap();
    c.set("modules_to_save", "embed_tokens").unwrap();
    assert_eq!((c.lora_rank, c.learning_rate), (4, 1e-5));
    assert_eq!(c.modules_to_save, ["embed_tokens"]);
    // unknown keys and bad values are errors that name the key
    let e = c.set("lora_rnak", "4").unwrap_err().to_string();
    assert!(e.contains("lora_rnak"), "{e}");
    let e = format!("{:#}", c.set("lora_rank", "eight").unwrap_err());
    assert!(e.contains("lora_rank"), "{e}");
    std::fs::write(&path, "bogus_key = 1\n").unwrap();
    let e = format!("{:#}", c.merge_toml_file(&path).unwrap_err());
    assert!(e.contains("bogus_key") && e.contains("run.toml"), "{e}");
}
