# TeCoA (Mao et al. 2023) on the demo: supervised robust fine-tuning of the plain CLIP tower,
# cross-entropy over cosine similarities with the class prompts; the same budget as demo_fare.
#   python train.py config/demo_tecoa.py
exec(open('config/demo_fare.py').read())
out_dir = 'out/demo_tecoa'
loss = 'tecoa'
tecoa_templates = ()              # train on the run's own prompt ensemble: a random text tower knows no
                                  # 'This is a photo of a {}' (README: one plain prompt gets 53% zero-shot, the ensemble 66%)
