from groupdir.kernels.flops import histogram_width, matmul_flops


def test_histogram_width_is_a_power_of_two_of_at_least_16():
    assert [histogram_width(g) for g in (1, 5, 16, 17, 200, 256, 257)] == [16, 16, 16, 32, 256, 256, 512]


def test_matmul_flops_by_hand_for_b_4_d_40_g_3():
    # S = Z Z^T: 4 x 4 dots of length 40, 2 FLOPs per multiply-add = 1280; the forward kernel adds the
    # (4 x 4) exp tile times the (4 x 16) one-hot groups = 512. Backward: autograd does dS Z and
    # dS^T Z (1280 each); the kernel rebuilds S once (1280) and does (G + G^T) Z once (1280); the old
    # kernel rebuilt S for each of the 2 feature chunks of 32, per side: 2 * (2 * 1280 + 1280).
    flops = matmul_flops(batch=4, dim=40, num_groups=3)
    assert flops["floor"] == flops["torch"] == flops["naive"] == (1280, 2560)
    assert flops["triton"] == (1792, 2560)
    assert flops["triton, old backward"] == (1792, 7680)
