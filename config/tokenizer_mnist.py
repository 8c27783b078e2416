# MNIST-5k on CPU: 4 residual levels x K=4096 codes, an 8x8 grid of D=8 latents (256 tokens/image).
# python -m support.train_tokenizer config/tokenizer_mnist.py   (README.md: its time and PSNR)
# then: python -m support.encode --ckpt=out/tokenizer_mnist/ckpt.pt --split=train (and --split=val)
out_dir = "out/tokenizer_mnist"
dataset = "mnist"
image_size = 32
channels = (32, 64, 64)   # 32 -> 16 -> 8: downsample 4
downsample = 4
num_res_blocks = 1
code_dim = 8
levels = 4
codebook_size = 4096
batch_size = 64           # 64 images x 64 positions = 4096 latents per step, ~1 per code
max_iters = 600           # README.md's tokenizer section reports the PSNR and code usage it reaches
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 50
restart_after = 20        # a code unused for 20 steps (~80k latents) is moved
util_window = 20
eval_interval = 200
log_interval = 25
