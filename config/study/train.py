# The study's generator (study.py sets loss / tau / label_smoothing / seed / out_dir per run):
# the AR "mini" transformer (4 layers, 128 wide) over config/study/tokenizer.py's codes
# (T = 64 tokens, one level of K = 16,384), the same model, data, steps and seeds for every loss.
#   python train.py config/study/train.py --loss=snce --tau=0.01 --out_dir=out/study/runs/x
data_dir = "out/study/tokenizer/encoded_train"
val_dir = "out/study/tokenizer/encoded_val"
model_size = "mini"
mode = "ar"
# tau_scale stays "none" (the default): one level. SNCE's target: --tau=... in the tokenizer's own
# units (as in the paper), or --target_perplexity=... (tau = 0, the default: tau calibrated at
# startup so that the target spreads over that many codes on average; 25 unless given)
batch_size = 32            # 32 x 64 = 2,048 tokens per step; 4,500 images = 140 steps per epoch
max_iters = 400            # ~2.8 epochs
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 30
weight_decay = 0.05
eval_interval = 100
eval_iters = 0             # the whole val split (500 digits, 32,000 tokens) at every eval
log_interval = 10
grid_per_class = 8
grid_cfg_scale = 3.0
grid_top_k = 10            # the evals' samples (and study.py's FID): cfg 3, top-k 10. Plain sampling
                           # (T = 1, all K codes) scores far lower for every objective: K = 16,384
                           # CE at step 1,200: 0.39 (1,000 samples) -> 0.74 (200); SNCE at step 1,050: 0.54 -> 0.89
