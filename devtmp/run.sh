set -x
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1
python3 -c "import transformers, torch; print(transformers.__version__, torch.__version__)"
python3 -m dcc validate devtmp/st --model devtmp/stories_hf --device cuda 2>&1 | tail -8
python3 -m dcc validate devtmp/st --model devtmp/stories_hf --device cpu 2>&1 | tail -3
python3 -m dcc eval devtmp/st --ppl devtmp/eval.txt --seq-len 256 --device cuda -q
python3 -m dcc eval devtmp/st --ppl devtmp/eval.txt --seq-len 256 --device cpu -q
python3 -m pytest -q -p no:cacheprovider tests/runtime/test_cuda_w4a16.py 2>&1 | tail -3
