"""Forward+backward time and parameters of the decoder presets on this machine's CPU (or GPU if present).
Usage: python bench/decoder_speed.py [--bs 16] [--reps 2] [--all]

Each decoder is built by `decoder_for` from the encoder it would sit on (paper-size encoders, built on the meta
device: only their embed_dim, in_chans, patch_size and input scale are read), and fed a 120-px tile as that encoder
reads it."""
import argparse, time, torch
from spseg.encoders import VirTuesEncoder, CellViTEncoder
from spseg.decoder import decoder_for, n_params

CASES = {  # name: the encoder the decoder is built for
    'SP 8-px (VirTues 512)': lambda: VirTuesEncoder('paper'),
    'SP 4-px (VirTues 512)': lambda: VirTuesEncoder('paper', patch=4),
    'H&E 16-px (ViT-S 384), ×2': lambda: CellViTEncoder('paper'),
}

def bench(preset, enc, tile, bs, reps, device, **kw):
    dec = decoder_for(enc, preset, heads=dict(types=10), **kw).to(device)
    g, side = enc.token_grid(tile), tile * enc.input_scale
    x = torch.randn(bs, enc.in_chans, side, side, device=device)
    z = [torch.randn(bs, enc.embed_dim, g, g, device=device) for _ in range(4)]
    def step():
        out = dec(x, z)['types']
        out.float().mean().backward()
        if device == 'cuda': torch.cuda.synchronize()
    step()
    t = time.perf_counter()
    for _ in range(reps): step()
    return n_params(dec), (time.perf_counter() - t) / reps

if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--bs', type=int, default=16)
    ap.add_argument('--reps', type=int, default=2)
    ap.add_argument('--all', action='store_true', help='variants at paper width too')
    a = ap.parse_args()
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    print(f'device={device} threads={torch.get_num_threads()} bs={a.bs}, 120-px tiles')
    for name, make in CASES.items():
        with torch.device('meta'): enc = make()
        for preset in ('tiny', 'paper'):
            for variant in ((None, 'global', 'masked') if preset == 'tiny' or a.all else (None,)):
                p, s = bench(preset, enc, 120, a.bs, a.reps, device, attention=variant)
                print(f'{name:27s} {preset:5s} {str(variant):6s} params={p:>11,d}  fwd+bwd {1000 * s:8.1f} ms/batch')
