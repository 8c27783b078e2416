"""
The generator recipe of the SNCE paper's Table 1 ("Geometry-Aware Supervision for Scalable
Discrete Image Generation"): an IBQ-B autoregressive transformer on ImageNet 256 px with IBQ-B's
hyper-parameters (IBQ, arXiv 2412.02692: 32 GPUs x 24 = global batch 768, AdamW (0.9, 0.95),
lr 3e-4 with 6 warmup epochs, weight decay 0.05, dropout 0.1, class dropout 0.1, grad clip 1,
300 epochs, no EMA), the input embedding and output head sized to the tokenizer's codebook.
Differences from IBQ's trainer: our lr decays by cosine to 0.1x (IBQ: linear to 0.1x), weight
decay stays constant (IBQ: cosine to 0), and model.py's IBQ-B is 24 plain pre-norm blocks of
width 1024 (342M parameters with K = 16,384, as IBQ-B; IBQ's has 16 adaLN blocks).

Not used alone: a tokenizer file after it sets the data, the loss and the output directory:
    torchrun --standalone --nproc_per_node=8 train.py config/imagenet_ibqb_table1.py \
        config/imagenet_ibq262144.py                 # also imagenet_emu131072.py, imagenet_ibq16384.py
    # 4 nodes x 8 GPUs (IBQ's setup; the global batch stays 768), on each node:
    torchrun --nnodes=4 --node_rank=$NODE --master_addr=$HOST --master_port=29500 \
        --nproc_per_node=8 train.py config/imagenet_ibqb_table1.py config/imagenet_ibq262144.py
"""
model_size = "IBQ-B"
mode = "ar"
dropout = 0.1
class_dropout = 0.1
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
