# MNIST-5k generator on CPU: AR "mini" transformer (4 layers, 128 wide) over the 8x8x4 RQ codes
# (T = 256, K = 4096) of config/tokenizer_mnist.py, trained with SNCE. The whole CPU pipeline:
#   python -m support.train_tokenizer config/tokenizer_mnist.py                              # tokenizer
#   python -m support.encode --ckpt=out/tokenizer_mnist/ckpt.pt --split=train               # memmaps
#   python -m support.encode --ckpt=out/tokenizer_mnist/ckpt.pt --split=val
#   python train.py config/train_mnist.py                                           # this file
#   python sample.py config/sample_mnist.py                                         # grid (+ FID)
# Baselines: --loss=ce --out_dir=out/train_mnist_ce, --loss=ls --out_dir=out/train_mnist_ls
out_dir = "out/train_mnist"
data_dir = "out/tokenizer_mnist/encoded_train"
val_dir = "out/tokenizer_mnist/encoded_val"
model_size = "mini"
mode = "ar"
loss = "snce"
tau_scale = "gap"          # tau = 1 (the default) in units of each level's median nearest-code gap:
                           # RQ residuals shrink level by level, so one absolute tau can't fit all
batch_size = 32            # 32 x 256 = 8,192 tokens per step
max_iters = 1500           # README.md's MNIST section shows these samples and their timing
learning_rate = 2e-3       # a small model: a large learning rate
min_lr = 2e-4
warmup_iters = 30
weight_decay = 0.05
ema_decay = 0.0
eval_interval = 200
eval_iters = 8             # 8 x 32 = 256 of the 500 val digits per eval (the last eval too)
log_interval = 10
grid_per_class = 8
grid_cfg_scale = 3.0
