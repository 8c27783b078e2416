# ImageNet 256px, factor 16 (16x16 grid), D=16, one level of K=16,384 codes (plain VQ).
# Expects {data_root}/train/<class>/*.JPEG and {data_root}/val/<class>/*.JPEG.
# torchrun --standalone --nproc_per_node=8 -m support.train_tokenizer config/tokenizer_imagenet.py \
#     --data_root=/data/imagenet --scan_images=True
# Pixel MSE only (no perceptual / GAN loss): good codes for SNCE experiments, blurry pictures.
out_dir = "out/tokenizer_imagenet"
dataset = "folder"
image_size = 256
random_flip = True
num_workers = 8
channels = (128, 128, 256, 256, 512)  # 256 -> 128 -> 64 -> 32 -> 16: downsample 16 (VQGAN's)
downsample = 16
num_res_blocks = 2
code_dim = 16
levels = 1                 # 4 for CODA-style residual quantization
codebook_size = 16384      # int32 codes above 65,536 (the paper's 131k / 262k settings)
metric = "l2"
restart_after = 20
batch_size = 32            # per GPU; 8 GPUs x 32 x 256 positions = 65k latents per step
max_iters = 200_000
learning_rate = 4e-4
min_lr = 4e-5
warmup_iters = 2000
log_interval = 100
eval_interval = 5000
eval_max = 2000
device = "cuda"
compile = False            # untested with torch.compile; try True on GPUs
