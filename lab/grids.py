"""Images for people: sample grids that say which labels each tile asked for (and, with the strict judge's
verdicts, what it holds: a coloured frame and a word), denoising strips that say which prompt each row draws.
Tiles are enlarged (nearest neighbour, whole factors, so pixels stay pixels) to at least MIN_TILE pixels: MLflow
shows an image at its own size, and 32-pixel tiles are too small to judge.
"""
import math

from PIL import Image, ImageDraw, ImageFont

from lab.data.iclevr import to_uint8

MIN_TILE = 64
PAD = 4
FRAME = 3  # the verdict's frame around a tile, in pixels
TEXT = (20, 20, 20)
# The strict judge's verdict on a tile -> its frame colour and word.
VERDICT_COLOURS = {"exact": ((20, 150, 40), "exact"), "extra": ((230, 130, 0), "extra object"),
                   "missing": ((200, 30, 30), "missing object"), "both": ((130, 40, 170), "extra + missing")}


def verdict_of(verdicts, i):
    """The VERDICT_COLOURS key of tile i (lab.eval.scene_verdicts)."""
    if verdicts["exact"][i]:
        return "exact"
    extra, missing = bool(verdicts["extra"][i]), bool(verdicts["missing"][i])
    return "both" if extra and missing else "extra" if extra else "missing"


def label_names_of(multi_hot, names):
    """Multi-hot rows -> the names they hold ('red sphere', ...), one list per row."""
    return [[names[i] for i in row.nonzero().flatten().tolist()] for row in multi_hot.cpu()]


def _tiles(images, min_tile):
    """(B, 3, H, W) in [-1, 1] -> PIL tiles of at least `min_tile` pixels a side."""
    factor = max(1, math.ceil(min_tile / images.shape[-1]))
    return [Image.fromarray(tile.permute(1, 2, 0).numpy()).resize(
        (tile.shape[-1] * factor, tile.shape[-2] * factor), Image.NEAREST) for tile in to_uint8(images.cpu())]


def _font():
    return ImageFont.load_default(size=11)


def labelled_grid(images, captions, nrow=8, min_tile=MIN_TILE, verdicts=None):
    """A grid of `images`, `nrow` per row, each with its caption lines (e.g. its labels) centred under it; with
    the strict judge's `verdicts`, each tile framed in its verdict's colour, the verdict as a last caption line
    in that colour, and a legend above the grid."""
    tiles, font = _tiles(images, min_tile), _font()
    marks = [verdict_of(verdicts, i) for i in range(len(tiles))] if verdicts is not None else None
    if marks:
        captions = [[*lines, VERDICT_COLOURS[mark][1]] for lines, mark in zip(captions, marks)]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = font.getbbox("Ag")[3] + 2
    text_w = max((measure.textlength(line, font=font) for lines in captions for line in lines), default=0)
    tile_w, tile_h = tiles[0].size
    frame = FRAME if marks else 0
    cell_w = max(tile_w + 2 * frame, math.ceil(text_w)) + PAD
    cell_h = tile_h + 2 * frame + max(map(len, captions), default=0) * line_h + 2 * PAD
    top = line_h + PAD if marks else 0
    rows = math.ceil(len(tiles) / nrow)
    canvas = Image.new("RGB", (min(nrow, len(tiles)) * cell_w + PAD, top + rows * cell_h + PAD), "white")
    draw = ImageDraw.Draw(canvas)
    if marks:
        x = PAD
        draw.text((x, PAD // 2), "strict judge:", fill=TEXT, font=font)
        x += draw.textlength("strict judge: ", font=font)
        for colour, word in VERDICT_COLOURS.values():
            draw.text((x, PAD // 2), word, fill=colour, font=font)
            x += draw.textlength(word + "   ", font=font)
    for i, (tile, lines) in enumerate(zip(tiles, captions)):
        x, y = PAD + (i % nrow) * cell_w, top + PAD + (i // nrow) * cell_h
        left = x + (cell_w - PAD - tile_w) // 2
        if marks:
            draw.rectangle((left - frame, y, left + tile_w + frame - 1, y + tile_h + 2 * frame - 1),
                           fill=VERDICT_COLOURS[marks[i]][0])
        canvas.paste(tile, (left, y + frame))
        for k, line in enumerate(lines):
            width = draw.textlength(line, font=font)
            colour = VERDICT_COLOURS[marks[i]][0] if marks and k == len(lines) - 1 else TEXT
            draw.text((x + (cell_w - PAD - width) / 2, y + tile_h + 2 * frame + 2 + k * line_h), line, fill=colour,
                      font=font)
    return canvas


def titled_rows(frames, titles, min_tile=MIN_TILE):
    """frames (rows, columns, 3, H, W): one row per title, the title on its left (a denoising strip: one
    prompt per row, from pure noise on the left to the final image on the right)."""
    columns = frames.shape[1]
    tiles, font = _tiles(frames.flatten(0, 1), min_tile), _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_w = math.ceil(max(measure.textlength(title, font=font) for title in titles)) + 2 * PAD
    tile_w, tile_h = tiles[0].size
    canvas = Image.new("RGB", (title_w + columns * (tile_w + PAD) + PAD, len(titles) * (tile_h + PAD) + PAD),
                       "white")
    draw = ImageDraw.Draw(canvas)
    text_h = font.getbbox("Ag")[3]
    for row, title in enumerate(titles):
        y = PAD + row * (tile_h + PAD)
        draw.text((PAD, y + (tile_h - text_h) / 2), title, fill=TEXT, font=font)
        for col in range(columns):
            canvas.paste(tiles[row * columns + col], (title_w + PAD + col * (tile_w + PAD), y))
    return canvas
