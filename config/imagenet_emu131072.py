"""
Table 1's K = 131,072 rows of the SNCE paper (CE 7.53 -> SNCE 3.62 FID at 100 epochs, 5.44 ->
3.42 at 300) with Emu3.5's vision tokenizer: an IBQ with 131,072 dot-product codes, trained on
large-scale text-to-image data. Emu3.5-VisionTokenizer (files model.ckpt + config.yaml) is on
the Emu3.5 project's (BAAI) model pages; pretrained.py reads the architecture from the weights,
so config.yaml is not needed. SNCE with tau = 1 (the paper's best; its temperature ablation ran
on this setting: 0.5 -> 5.17, 1 -> 3.42, 2 -> 3.46, 4 -> 5.36); `--loss=ce
--out_dir=out/imagenet_emu131072_ce` for the CE rows; `--max_iters=166818` (100 epochs) for the
100-epoch rows. Encode train and val as in config/imagenet_ibq16384.py with IBQ=model.ckpt and
ENC=/data/encoded/emu131072, then:

    torchrun --standalone --nproc_per_node=8 train.py config/imagenet_ibqb.py \
        config/imagenet_emu131072.py
    for s in 2.5 3.0 3.5 4.0 4.5 5.0 5.5; do
      torchrun --standalone --nproc_per_node=8 sample.py config/imagenet_ibqb_sample.py \
          --ckpt=out/imagenet_emu131072_snce/ckpt.pt --cfg_scale=$s --fid_weights=$W
    done
"""
out_dir = "out/imagenet_emu131072_snce"
data_dir = "/data/encoded/emu131072/train"
val_dir = "/data/encoded/emu131072/val"
loss = "snce"
tau = 1.0                   # the paper's setting for its IBQ tokenizer (dot metric); train.py's default
