#!/bin/bash
# the b_h-by-capacity hypothesis, on the valid split only (one document, first 131,072 tokens)
cd /work/main/runs/s11/bh
KNN="--set model.knn.layers=[2,3] --set model.knn.normalize=[2] --set model.knn.combine=joint --set model.knn.backend=auto"
COMMON="--split valid --max-docs 1 --no-progress --set data.corpus=/work/main/data/stdlib-byte-grouped --set data.batch_size=1 --set data.eval_min_doc_tokens=131072 --set data.eval_max_doc_tokens=131072 --set data.eval_buckets=[2048,8192,32768,65536]"
for run in "base:" "8192_-3:$KNN --set model.knn.capacity=8192 --set model.knn.gate_init=-3" \
           "65536_-3:$KNN --set model.knn.capacity=65536 --set model.knn.gate_init=-3" \
           "65536_-5:$KNN --set model.knn.capacity=65536 --set model.knn.gate_init=-5" \
           "8192_-5:$KNN --set model.knn.capacity=8192 --set model.knn.gate_init=-5"; do
  name=${run%%:*}; sets=${run#*:}
  mkdir -p $name && (cd $name && memformers eval demo-base $COMMON $sets > eval.log 2>&1)
  echo "$name done $(date)" >> ../bh.log
done
