"""
Table 1's K = 262,144 rows of the SNCE paper (CE 4.11 -> SNCE 3.20 FID at 300 epochs) with the
public IBQ tokenizer of that size: IBQ-Tokenizer-262144 (file imagenet256_262144.ckpt, the
SEED-Voken project's model pages, TencentARC); dot-product codes, D = 256. The paper's rows used
FVQ's 262,144-code tokenizer (l2 codes), which pretrained.py does not load; the generator
(840.2M parameters in all with this K, config/imagenet_ibqb.py says what is counted) and recipe
are the same. SNCE with tau = 1 (the paper's value for a dot-product tokenizer with D = 256);
`--loss=ce --out_dir=out/imagenet_ibq262144_ce` for the CE row. Encode train and val as in config/imagenet_ibq16384.py with IBQ=imagenet256_262144.ckpt
and ENC=/data/encoded/ibq262144, then:

    torchrun --standalone --nproc_per_node=8 train.py config/imagenet_ibqb.py \
        config/imagenet_ibq262144.py
    for s in 2.5 3.0 3.5 4.0 4.5 5.0 5.5; do
      torchrun --standalone --nproc_per_node=8 sample.py config/imagenet_ibqb_sample.py \
          --ckpt=out/imagenet_ibq262144_snce/ckpt.pt --cfg_scale=$s --fid_weights=$W
    done
"""
out_dir = "out/imagenet_ibq262144_snce"
data_dir = "/data/encoded/ibq262144/train"
val_dir = "/data/encoded/ibq262144/val"
loss = "snce"
tau = 1.0                   # the paper's setting for its IBQ tokenizer (dot metric); train.py's default
