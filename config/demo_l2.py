# Exercise: an L_2 threat model. Stage 1 as the default but the attack lives in an L_2 ball
# of radius 0.5 (16x16x3 pixels in [0,1]); PGD-20 evaluation in the same ball with step
# 2.5 eps / 20 (1/255 steps could not even reach the ball's surface in 20 steps).
#   python train.py config/demo_l2.py
# Cross-evaluate against the default (L_inf) run, e.g.:
#   python eval_autoattack.py --ckpt out/demo_l2 --pgd20 --norm Linf --eps 8/255
out_dir = 'out/demo_l2'
norm = 'L2'
eps = 0.5
pgd_step_size = 0.5
eval_step_size = 2.5 * 0.5 / 20
