# The study's generator (study.py sets loss / target_perplexity / label_smoothing / dropout / seed / out_dir):
# the AR "mini" transformer (4 layers, 128 wide) over config/study/tokenizer.py's codes
# (T = 64 tokens, one level of K = 16,384), the same model, data, steps and seeds for every loss.
#   python train.py config/study/train.py --loss=snce --target_perplexity=95 --out_dir=out/study/runs/x
#   python train.py config/study/train.py --loss=snce --target_perplexity=0 --tau=0.01 --out_dir=out/study/runs/y
data_dir = "out/study/tokenizer/encoded_train"
val_dir = "out/study/tokenizer/encoded_val"
model_size = "mini"
mode = "ar"
target_perplexity = 25.0   # SNCE: tau calibrated so q spreads over this many codes on average (one level)
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
grid_top_k = 10            # the evals' samples (and study.py's FID): cfg 3, top-k 10; plain sampling
                           # (all K codes) scores far lower for every objective (README.md's Results)
