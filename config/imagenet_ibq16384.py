"""
Table 1's baseline row of the SNCE paper: IBQ-B trained with CE on IBQ's K = 16,384 tokenizer
(the IBQ paper reports FID 2.88 at 300 epochs). IBQ-Tokenizer-16384 (file imagenet256_16384.ckpt)
is on the SEED-Voken project's (TencentARC) model pages; dot-product codes, D = 256. Steps (with
the encoder's EMA weights; `pretrained.py` says which set it loaded; int8 latents: 85 GB for
ImageNet train instead of float16's 168 GB, see encode.py):

    IBQ=/ckpt/imagenet256_16384.ckpt; ENC=/data/encoded/ibq16384
    torchrun --standalone --nproc_per_node=8 -m support.encode --ckpt=$IBQ --dataset=folder \
        --data_root=/data/imagenet --image_size=256 --split=train --encode_dir=$ENC/train \
        --latents_dtype=int8 --device=cuda --num_workers=8
    torchrun --standalone --nproc_per_node=8 -m support.encode --ckpt=$IBQ --dataset=folder \
        --data_root=/data/imagenet --image_size=256 --split=val --encode_dir=$ENC/val \
        --latents_dtype=int8 --device=cuda --num_workers=8
    torchrun --standalone --nproc_per_node=8 train.py config/imagenet_ibqb.py \
        config/imagenet_ibq16384.py                               # --loss=snce: the SNCE variant
    for s in 2.5 3.0 3.5 4.0 4.5 5.0 5.5; do                      # FID-50k over the CFG sweep
      torchrun --standalone --nproc_per_node=8 sample.py config/imagenet_ibqb_sample.py \
          --ckpt=out/imagenet_ibq16384_ce/ckpt.pt --cfg_scale=$s --fid_weights=$W
    done
"""
out_dir = "out/imagenet_ibq16384_ce"
data_dir = "/data/encoded/ibq16384/train"
val_dir = "/data/encoded/ibq16384/val"
loss = "ce"                 # --loss=snce: train.py's tau = 1 (dot metric, D = 256: the paper's best)
