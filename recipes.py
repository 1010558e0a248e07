"""
recipes.py: each paper's settings as its released code runs them, one table. `--recipe NAME` (common.parse_args)
fills every flag the command line did not give from RECIPES[NAME]["all"] and the script's own part ("grpo", "sft",
"eval"); a script takes the keys it has flags for. Where a paper and its released code disagree, the code wins: a
user reproducing a paper runs the code (docs/methods.md says where they differ). docs/recipes.md's table names the
file each value comes from. Pixel budgets are in Qwen2.5-VL's units of 28 x 28 = 784 px.
"""

RECIPES = {
    # justgogorunrun/VLM-R3: run_rgrpo_vllm.sh, src/r1-v/src/open_r1/rgrpo.py and trainer/vllm_rgrpo_trainer.py
    # (RL), qwen_vl_finetune/sft_7b.sh (SFT), src/eval/test_vstar_r3.py (eval)
    "vlm_r3": dict(
        all=dict(tools="zoom_in", view_max_pixels=4096 * 784, crop_max_pixels=1024 * 784, max_turns=8,
                 max_turn_tokens=2048, max_tokens=8 * 2048, freeze_vision=True),
        grpo=dict(preset="vlm_r3", group_size=5, prompts=8, lr=1e-6, schedule="constant", warmup=0, weight_decay=0.0,
                  adam_betas=(0.9, 0.999), grad_clip=1.0, eps_low=0.2, eps_high=0.28, beta=0.0, temperature=1.0,
                  top_p=1.0, loss_type="grpo", scale_rewards="group"),
        sft=dict(lr=2e-7, schedule="cosine", warmup=0.03, weight_decay=0.0, adam_betas=(0.9, 0.999), grad_clip=1.0,
                 view_max_pixels=2048 * 784, crop_max_pixels=2048 * 784, max_tokens=4096),
        eval=dict(view_min_pixels=32 * 784, view_max_pixels=8192 * 784, crop_min_pixels=32 * 784,
                  crop_max_pixels=4096 * 784, temperature=0.0)),  # (lmms-eval: 12 x 4096 tokens)
    # TIGER-AI-Lab/VL-Rethinker: scripts/train_vlm_multi.sh, openrlhf/trainer/ppo_utils/experience_maker.py,
    # replay_buffer.py, openrlhf/models/loss.py, openrlhf/cli/train_ppo_ray.py; eval: scripts/eval_vlm_new.sh
    "vl_rethinker": dict(
        all=dict(tools="none", view_min_pixels=256 * 784, view_max_pixels=1280 * 784, max_turn_tokens=2048,
                 max_tokens=2048, answer_format="boxed"),
        # a rollout of 512 prompts trained in 8 optimizer steps; ssr_extend "before": its replay buffer takes a step's
        # samples before the fill draws (active_sampling); SSR and rethinking on, as the paper runs them (its launcher
        # leaves both off: its issues #3, #4)
        grpo=dict(preset="vl_rethinker", group_size=8, prompts=512, mini_batches=8, lr=1e-6, schedule="cosine",
                  lr_min_ratio=0.5, warmup=0.03, weight_decay=0.0, adam_betas=(0.9, 0.95), grad_clip=1.0, eps_low=0.2,
                  eps_high=0.35, beta=0.0, temperature=1.0, top_p=0.95, top_k=40, loss_type="bnpo",
                  scale_rewards="none", ssr=True, ssr_extend="before", rethink=True, rethink_prob=0.65,
                  rethink_truncate=0.5, rethink_temperature=0.9, aux_nll=0.05),
        eval=dict(temperature=0.0)),
    # AntResearchNLP/ViLaSR: train/rl/train_grpo.sh, config_grpo.yaml, verl/workers/actor/config.py,
    # verl/workers/rollout/vllm_rollout/vllm_rollout_spmd_video.py, verl/utils/reward_score/gcot.py;
    # train/cold_start/*/config_cold_start.yaml (SFT); eval/infer.sh, eval/infer.py (eval)
    "vilasr": dict(
        all=dict(tools="draw_box,draw_line", view_max_pixels=256 * 784, max_turns=10, max_images=43,
                 max_turn_tokens=1024, max_tokens=13312, stop_on=("error",), final_answer_turn=True),
        grpo=dict(preset="vilasr", group_size=8, prompts=32, mini_batches=2, lr=1e-6, schedule="constant", warmup=0,
                  weight_decay=1e-2, adam_betas=(0.9, 0.999), grad_clip=1.0, eps_low=0.2, eps_high=0.3, delta=3.0,
                  beta=0.0, temperature=1.0, top_p=1.0, loss_type="grpo", scale_rewards="group"),
        sft=dict(lr=1e-5, schedule="cosine", warmup=0.1, weight_decay=0.0, adam_betas=(0.9, 0.999), grad_clip=1.0,
                 view_max_pixels=1280 * 784, freeze_vision=True, max_tokens=18432),
        eval=dict(view_max_pixels=448 * 784, temperature=0.75, top_p=0.9, max_turn_tokens=16384, max_images=45,
                  max_tokens=10 * 16384)),  # (maze: 20 turns)
    # groundlight/r1_vlm: src/r1_vlm/environments/tool_use_text_vqa_env/ (tool_use_text_vqa_train.py,
    # tool_use_text_vqa_env.py), src/r1_vlm/tools/zoom.py, datasets/text_vqa/text_vqa_tool_use_r1.py;
    # its TRL fork: trl/trainer/qwen_grpo_trainer.py, grpo_config.py, callbacks.py
    "groundlight": dict(
        all=dict(tools="zoom_point", view_max_side=1024, view_max_pixels=16384 * 784, crop_max_pixels=16384 * 784,
                 zoom_window=400, zoom_source="view", max_turns=2, max_images=2, max_turn_tokens=2048,
                 max_tokens=2048, final_answer_turn=True),
        grpo=dict(preset="groundlight", group_size=3, prompts=4, lr=1e-5, schedule="cosine", warmup=10,
                  weight_decay=0.0, adam_betas=(0.9, 0.98), grad_clip=1e-4, eps_low=0.2, eps_high=0.28, beta=1e-4,
                  ref_sync_every=64, ref_sync_alpha=0.9, temperature=1.0, top_p=1.0, loss_type="grpo",
                  scale_rewards="group"),
        eval=dict(temperature=0.1, view_max_side=0)),  # V* / HR-Bench: the original (TextVQA: long side 1024)
    # Visual-Agent/DeepEyes: examples/agent/final_merged_v1v8_thinklite.sh, verl/trainer/config/ppo_trainer.yaml,
    # verl/utils/reward_score/vl_agent.py, verl/workers/agent/envs/mm_process_engine/visual_toolbox_v2.py
    "deepeyes": dict(  # 16384 x 784 = 12845056 px: Qwen2.5-VL's own max_pixels
        all=dict(tools="zoom_in", view_max_pixels=16384 * 784, crop_max_pixels=16384 * 784, adaptive_zoom=False,
                 max_turns=5, max_turn_tokens=10240, max_tokens=20480),
        grpo=dict(preset="deepeyes", group_size=16, prompts=256, lr=1e-6, schedule="constant", warmup=0,
                  weight_decay=0.01, adam_betas=(0.9, 0.999), grad_clip=1.0, eps_low=0.2, eps_high=0.2, delta=3.0,
                  beta=0.0, temperature=1.0, top_p=1.0, loss_type="bnpo", scale_rewards="group"),
        eval=dict(temperature=0.0, max_turns=11, max_tokens=11 * 10240)),  # eval/eval_vstar.py: <= 11 model calls
    # Mini-o3/Mini-o3 (evaluation only): README's eval command (val_n 32 sampled at T 1.0, 12 rounds, 12 images),
    # verl/workers/rollout/vllm_rollout/vllm_async_engine.py, function_tools.py (no upscale of a crop)
    "mini_o3": dict(
        all=dict(tools="zoom_in", view_min_pixels=40_000, view_max_pixels=2_000_000, crop_min_pixels=40_000,
                 crop_max_pixels=2_000_000, adaptive_zoom=False, max_turns=12, max_images=12, max_turn_tokens=8192,
                 max_tokens=32768),
        eval=dict(temperature=1.0, samples=32)),
    # TIGER-AI-Lab/Pixel-Reasoner (evaluation only): scripts/eval_vlm_new.sh (what vLLM shows: 512 to 5120 x 784 px),
    # curiosity_driven_rl/openrlhf/trainer/ppo_utils/experience_maker.py (greedy at eval, 2048 tokens a call)
    "pixel_reasoner": dict(
        all=dict(tools="zoom_in", view_min_pixels=512 * 784, view_max_pixels=5120 * 784, crop_min_pixels=256 * 784,
                 crop_max_pixels=5120 * 784, adaptive_zoom=False, max_turns=5, max_images=16, max_turn_tokens=2048,
                 max_tokens=12 * 1024),
        eval=dict(temperature=0.0)),
}
