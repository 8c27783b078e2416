# The study's tokenizer (study.py): MNIST-5k, one VQ level (as in the paper) with a codebook that is large
# for this data: K = 16,384 codes for 4,500 x 64 = 288k training latents (~18 latents per code),
# an 8x8 grid of D=8 latents (T = 64 tokens per image). Run by study.py (--codebook_size, and in its
# second design --seed); by hand:
#   python -m support.train_tokenizer config/study/tokenizer.py
out_dir = "out/study/tokenizer"
dataset = "mnist"
image_size = 32
channels = (32, 64, 64)   # 32 -> 16 -> 8: downsample 4
downsample = 4
num_res_blocks = 1
code_dim = 8
levels = 1
codebook_size = 16384
batch_size = 96           # 96 x 64 = 6,144 latents per step, ~0.4 per code
max_iters = 600
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 50
restart_after = 40        # P(a code with fair share goes 40 steps unused) ~ e^-15
kmeans_batches = 6        # 6 x 6,144 = 36,864 latents (>= K) for the k-means init
util_window = 40
eval_interval = 200
log_interval = 25
