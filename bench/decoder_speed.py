"""Forward+backward time and parameters of the decoder presets on this machine's CPU (or GPU if present).
Usage: python bench/decoder_speed.py [--bs 16] [--reps 2] [--all]"""
import argparse, time, torch
from spseg.decoder import decoder_preset, n_params

CASES = {  # name: (encoder embed_dim, patch size, image channels, tile size)
    'SP 8-px (VirTues 512), 120 tile': (512, 8, 16, 120),
    'H&E 16-px (ViT-S 384), 240 tile': (384, 16, 3, 240),
}

def bench(preset, embed, patch, chans, tile, bs, reps, device, **kw):
    dec = decoder_preset(preset, heads=dict(types=10), embed_dim=embed, patch_size=patch, in_chans=chans, **kw).to(device)
    g = tile // patch
    x, z = torch.randn(bs, chans, tile, tile, device=device), [torch.randn(bs, embed, g, g, device=device) for _ in range(4)]
    def step():
        out = dec(x, z)['types']; out.float().mean().backward()
        if device == 'cuda': torch.cuda.synchronize()
    step()
    t = time.perf_counter()
    for _ in range(reps): step()
    return n_params(dec), (time.perf_counter() - t) / reps

if __name__ == '__main__':
    ap = argparse.ArgumentParser(); ap.add_argument('--bs', type=int, default=16); ap.add_argument('--reps', type=int, default=2)
    ap.add_argument('--all', action='store_true', help='variants at paper width too')
    a = ap.parse_args()
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    print(f'device={device} threads={torch.get_num_threads()} bs={a.bs}')
    for name, (embed, patch, chans, tile) in CASES.items():
        for preset in ('tiny', 'paper'):
            for variant in ((None, 'global', 'masked') if preset == 'tiny' or a.all else (None,)):
                p, s = bench(preset, embed, patch, chans, tile, a.bs, a.reps, device, attention=variant)
                print(f'{name:34s} {preset:5s} {str(variant):6s} params={p:>11,d}  fwd+bwd {1000 * s:8.1f} ms/batch')
