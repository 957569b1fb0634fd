// The inpainting mask: the input image below, a canvas of the same size above it where the
// pointer paints. The mask sent is white where painted, black elsewhere, at image size.

export class Painter {
  constructor(box, imageCanvas, maskCanvas, brush) {
    this.box = box;
    this.image = imageCanvas;
    this.mask = maskCanvas;
    this.brush = brush;
    this.painted = false;
    this.drawing = false;
    this.mask.addEventListener("pointerdown", (e) => this.down(e));
    this.mask.addEventListener("pointermove", (e) => this.move(e));
    for (const name of ["pointerup", "pointercancel", "pointerleave"]) {
      this.mask.addEventListener(name, () => { this.drawing = false; });
    }
  }

  /** Show an image (any URL the page may display) and start a blank mask of its size. */
  load(url) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => {
        for (const canvas of [this.image, this.mask]) {
          canvas.width = img.naturalWidth;
          canvas.height = img.naturalHeight;
        }
        this.image.getContext("2d").drawImage(img, 0, 0);
        this.clear();
        this.box.hidden = false;
        this.image.dataset.source = url; // which image is shown (tests wait on it)
        resolve({ width: img.naturalWidth, height: img.naturalHeight });
      };
      img.onerror = () => reject(new Error("the image could not be shown"));
      img.src = url;
    });
  }

  point(event) {
    const rect = this.mask.getBoundingClientRect();
    return [
      ((event.clientX - rect.left) * this.mask.width) / rect.width,
      ((event.clientY - rect.top) * this.mask.height) / rect.height,
    ];
  }

  down(event) {
    event.preventDefault();
    this.drawing = true;
    this.last = this.point(event);
    this.stroke(this.last);
  }

  move(event) {
    if (!this.drawing) return;
    this.stroke(this.point(event));
  }

  stroke(to) {
    const ctx = this.mask.getContext("2d");
    const scale = this.mask.width / this.mask.getBoundingClientRect().width;
    ctx.strokeStyle = ctx.fillStyle = "#fff";
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.lineWidth = Number(this.brush.value) * scale;
    ctx.beginPath();
    ctx.moveTo(...this.last);
    ctx.lineTo(...to);
    ctx.stroke();
    this.last = to;
    this.painted = true;
  }

  /** The keyboard's way to a mask: all of the image. */
  fill() {
    const ctx = this.mask.getContext("2d");
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, this.mask.width, this.mask.height);
    this.painted = true;
  }

  clear() {
    this.mask.getContext("2d").clearRect(0, 0, this.mask.width, this.mask.height);
    this.painted = false;
  }

  /** The mask as a base64 PNG (white = regenerate), or null when nothing is painted. */
  toBase64() {
    if (!this.painted) return null;
    const out = document.createElement("canvas");
    out.width = this.mask.width;
    out.height = this.mask.height;
    const ctx = out.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, out.width, out.height);
    ctx.drawImage(this.mask, 0, 0);
    return out.toDataURL("image/png").split(",", 2)[1];
  }
}
