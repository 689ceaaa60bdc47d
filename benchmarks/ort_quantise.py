"""Side experiment for (a): does int8 static quantisation speed ONNX Runtime up on this CPU? (It did not.)

    python benchmarks/ort_quantise.py MODEL.onnx

Quantises MODEL.onnx (QOperator, QUInt8 activations, QInt8 weights, 1,000 MNIST test digits for calibration)
to /tmp/q8.onnx and prints MNIST test accuracy and digits/s (wall and per CPU-second) of both models for
batch 64-4096 and 1-2 intra-op threads. Needs MNIST at /work/shared/data/mnist.
"""
import sys
import time

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from hwr_batch.mnist import load_mnist

src=sys.argv[1]
d=load_mnist("test","/work/shared/data/mnist"); x=(d.images.astype(np.float32)/255)[...,None]; y=d.labels
class R(CalibrationDataReader):
    def __init__(s): s.it=iter([{"image": x[i:i+100]} for i in range(0,1000,100)])
    def get_next(s): return next(s.it,None)
name=ort.InferenceSession(src,providers=['CPUExecutionProvider']).get_inputs()[0].name
class R2(R):
    def __init__(s): s.it=iter([{name: x[i:i+100]} for i in range(0,1000,100)])
quant_pre_process(src,'/tmp/pre.onnx',skip_symbolic_shape=True)
quantize_static('/tmp/pre.onnx','/tmp/q8.onnx',R2(),quant_format=QuantFormat.QOperator,activation_type=QuantType.QUInt8,weight_type=QuantType.QInt8)
for path in (src,'/tmp/q8.onnx'):
  for th in (1,2):
    so=ort.SessionOptions(); so.intra_op_num_threads=th; so.inter_op_num_threads=1
    s=ort.InferenceSession(path,so,providers=['CPUExecutionProvider'])
    p=s.run(None,{name:x})[0]; acc=(p.argmax(1)==y).mean()
    for bs in (64,256,1024,4096):
      best=None
      for r in range(3):
        c=time.process_time(); t=time.perf_counter()
        for i in range(0,len(x),bs): s.run(None,{name:x[i:i+bs]})
        w=time.perf_counter()-t; cp=time.process_time()-c
        if best is None or w<best[0]: best=(w,cp)
      print(f"{path.split('/')[-1]:12s} threads={th} bs={bs:5d} acc={acc:.4f} {len(x)/best[0]:8.0f} digits/s wall {len(x)/best[1]:8.0f} digits/cpu-s", flush=True)
