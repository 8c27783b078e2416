"""
ImageNet 256 class-conditional AR generator in the paper's Table 1 setting, as far as our
tokenizer allows: IBQ-B (24 layers, 1024 wide, 16 heads; ~342M params with a 131k-way head),
global batch 256, 300 epochs, AdamW (0.9, 0.95), lr 1e-4, weight decay 0.05, class dropout
0.1 (LlamaGen / IBQ recipe), SNCE with tau = 1.0 (the paper's best) on the tokenizer's metric.
The paper's tokenizers (Emu3.5, K = 131,072; FVQ, K = 262,144) are not ours: train ours with a
large codebook (`--codebook_size=131072`, config/tokenizer_imagenet.py) and encode both splits:

    torchrun --standalone --nproc_per_node=8 train_tokenizer.py config/tokenizer_imagenet.py \
        --data_root=/data/imagenet --codebook_size=131072
    torchrun --standalone --nproc_per_node=8 encode.py --ckpt=out/tokenizer_imagenet/ckpt.pt \
        --split=train --device=cuda        # -> out/tokenizer_imagenet/encoded_train
    torchrun --standalone --nproc_per_node=8 encode.py --ckpt=out/tokenizer_imagenet/ckpt.pt \
        --split=val --device=cuda

Train (8 GPUs, one node; 32 per GPU x 8 = 256):
    torchrun --standalone --nproc_per_node=8 train.py config/imagenet_ibqb.py
    torchrun --standalone --nproc_per_node=8 train.py config/imagenet_ibqb.py \
        --loss=ce --out_dir=out/imagenet_ibqb_ce                       # the CE baseline
    torchrun ... --init_from=resume                                   # continue exactly
Several nodes (4 x 8 GPUs; global batch stays 256 = 8 per GPU x 32 ranks); on each node:
    torchrun --nnodes=4 --node_rank=$NODE --master_addr=$HOST --master_port=29500 \
        --nproc_per_node=8 train.py config/imagenet_ibqb.py --batch_size=8 \
        --gradient_accumulation_steps=32
Then sample: config/imagenet_ibqb_sample.py (CFG sweep 2.5 .. 5.5, FID-50k).
"""
out_dir = "out/imagenet_ibqb_snce"
data_dir = "out/tokenizer_imagenet/encoded_train"
val_dir = "out/tokenizer_imagenet/encoded_val"
model_size = "IBQ-B"
mode = "ar"
class_dropout = 0.1
loss = "snce"
tau = 1.0
tau_scale = "none"          # one level (plain VQ): tau as in the paper
batch_size = 32             # per GPU
gradient_accumulation_steps = 8  # global (divided by the world size): 8 GPUs -> 1 micro-step each
max_iters = 300 * 1281167 // 256  # 300 epochs of 1,281,167 images at 256 per step = 1,501,367
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 5000
weight_decay = 0.05
grad_clip = 1.0
ema_decay = 0.9999
eval_interval = 10000
eval_iters = 20             # val batches per GPU: 8 x 20 x 32 = 5,120 images
log_interval = 10
grid_classes = (88, 207, 279, 360, 387, 417, 974, 979)
grid_per_class = 8
grid_cfg_scale = 4.0
device = "cuda"
dtype = "bfloat16"
compile = True
