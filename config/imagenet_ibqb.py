"""
ImageNet 256 px class-conditional AR generator: the recipe of the SNCE paper's Table 1
("Geometry-Aware Supervision for Scalable Discrete Image Generation"), an IBQ-B transformer with
IBQ-B's hyper-parameters (IBQ, arXiv 2412.02692: 32 GPUs x 24 = global batch 768, AdamW
(0.9, 0.95), lr 3e-4 with 6 warmup epochs, weight decay 0.05, dropout 0.1, class dropout 0.1,
grad clip 1, 300 epochs, no EMA), the input embedding and output head sized to the tokenizer's
codebook. SNCE with train.py's default tau = 1 (the paper's setting for its IBQ tokenizer: dot
metric, D = 256) on the tokenizer's metric.
Differences from IBQ's trainer: our lr decays by cosine to 0.1x (IBQ: linear to 0.1x), weight
decay stays constant (IBQ: cosine to 0), and model.py's IBQ-B is 24 plain pre-norm blocks of
width 1024 (IBQ's has 16 adaLN blocks). Counted over every parameter of model.py's GPT (the
24 blocks' 302.0M, the token / position / class embeddings, the final norm and the K-way head):
336.9M with K = 16,384 (IBQ-B's tokenizer) and 840.2M with K = 262,144, where the input
embedding and the head are 268.4M each.

The paper's tokenizers: a file after this one sets the data, loss and output directory for a
downloaded tokenizer (pretrained.py; encode commands in each file):
    torchrun --standalone --nproc_per_node=8 train.py config/imagenet_ibqb.py config/imagenet_ibq262144.py
    torchrun --standalone --nproc_per_node=8 train.py config/imagenet_ibqb.py config/imagenet_emu131072.py
    torchrun --standalone --nproc_per_node=8 train.py config/imagenet_ibqb.py config/imagenet_ibq16384.py
Alone, it trains on this repo's own ImageNet tokenizer (pixel MSE only: blurry decodes, so its
FIDs are not the paper's; its metric is l2, where tau = 1 is not the paper's setting:
--target_perplexity=25 calibrates tau instead), encoded first:
    torchrun --standalone --nproc_per_node=8 -m support.train_tokenizer config/tokenizer_imagenet.py \
        --data_root=/data/imagenet --codebook_size=131072
    torchrun --standalone --nproc_per_node=8 -m support.encode --ckpt=out/tokenizer_imagenet/ckpt.pt \
        --split=train --device=cuda        # -> out/tokenizer_imagenet/encoded_train
    torchrun --standalone --nproc_per_node=8 -m support.encode --ckpt=out/tokenizer_imagenet/ckpt.pt \
        --split=val --device=cuda
    torchrun --standalone --nproc_per_node=8 train.py config/imagenet_ibqb.py
Either way: --loss=ce --out_dir=... for the CE row, --init_from=resume continues exactly.
4 nodes x 8 GPUs (IBQ's setup; the global batch stays 768: 24 per GPU, 1 micro-step), on each node:
    torchrun --nnodes=4 --node_rank=$NODE --master_addr=$HOST --master_port=29500 \
        --nproc_per_node=8 train.py config/imagenet_ibqb.py config/imagenet_ibq262144.py
Then sample: config/imagenet_ibqb_sample.py (CFG sweep 2.5 .. 5.5, FID-50k).
"""
out_dir = "out/imagenet_ibqb_snce"
data_dir = "out/tokenizer_imagenet/encoded_train"
val_dir = "out/tokenizer_imagenet/encoded_val"
model_size = "IBQ-B"
mode = "ar"
dropout = 0.1
class_dropout = 0.1
loss = "snce"                          # tau = 1, tau_scale = none: train.py's defaults (not set
                                       # here, so --loss=ce warns of nothing)
batch_size = 24                        # per GPU and micro-step
gradient_accumulation_steps = 32       # global: 8 GPUs -> 4 micro-steps each; 32 GPUs -> 1
max_iters = 300 * 1281167 // 768       # 300 epochs of ImageNet-1k train = 500,455 steps
warmup_iters = 6 * 1281167 // 768      # 6 epochs = 10,009 steps
learning_rate = 3e-4
min_lr = 3e-5
weight_decay = 0.05
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
ema_decay = 0.0
eval_interval = 10000
eval_iters = 20                        # val batches per GPU
log_interval = 10
grid_classes = (88, 207, 279, 360, 387, 417, 974, 979)
grid_per_class = 8
grid_cfg_scale = 4.0
device = "cuda"
dtype = "bfloat16"
compile = True
