"""
FID-50k of config/imagenet_ibqb.py's generator, sweeping CFG from 2.5 to 5.5 as the paper does
(it reports the best). Each run writes an ADM .npz (50,000 x 256 x 256 x 3 uint8 + labels) and
appends {fid, cfg_scale, ...} to {out_dir}/fid.jsonl. W: the Inception TorchScript (sample.py).

    for s in 2.5 3.0 3.5 4.0 4.5 5.0 5.5; do
      torchrun --standalone --nproc_per_node=8 sample.py config/imagenet_ibqb_sample.py \
          --cfg_scale=$s --fid_weights=$W
    done
    # several nodes: torchrun --nnodes=4 --node_rank=$NODE --master_addr=$HOST \
    #     --master_port=29500 --nproc_per_node=8 sample.py config/imagenet_ibqb_sample.py ...
    # the CE baseline: --ckpt=out/imagenet_ibqb_ce/ckpt.pt
"""
ckpt = "out/imagenet_ibqb_snce/ckpt.pt"
num_samples = 50000
batch_size = 125            # per GPU: 50,000 / (8 x 125) = 50 batches each
cfg_scale = 4.0
temperature = 1.0
top_k = 0
per_class = 8
classes = (88, 207, 279, 360, 387, 417, 974, 979)
fid_split = "val"           # reference statistics of the 50k val images (cached)
device = "cuda"
dtype = "bfloat16"
