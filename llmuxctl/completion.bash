# bash completion for llmuxctl(1)                                  -*- shell-script -*-
#
# Completes commands, options, sleep levels, and model names. Model names come from
# the running daemon (`llmuxctl _models`, which falls back to the config's models when
# llmuxd does not answer); -c/-s on the line being completed are passed along.

_llmuxctl_models()
{
    local -a where=()
    local i
    for ((i = 1; i < ${#COMP_WORDS[@]} - 1; i++)); do
        case "${COMP_WORDS[i]}" in
            -c|--config|-s|--socket)
                where+=("${COMP_WORDS[i]}" "${COMP_WORDS[i+1]}") ;;
            --config=*|--socket=*)
                where+=("${COMP_WORDS[i]}") ;;
        esac
    done
    "${COMP_WORDS[0]}" "${where[@]}" _models 2>/dev/null
}

_llmuxctl()
{
    local cur prev words cword
    if declare -F _init_completion >/dev/null 2>&1; then
        _init_completion || return
    else
        cur="${COMP_WORDS[COMP_CWORD]}"
        prev="${COMP_WORDS[COMP_CWORD-1]}"
        words=("${COMP_WORDS[@]}")
        cword=$COMP_CWORD
    fi

    local commands="status start sleep wake kill switch logs reload validate version fleet"
    local global_opts="-c --config -s --socket --json -h --help -V --version"

    # The command is the first word that is not an option or an option's value.
    local cmd="" i
    for ((i = 1; i < cword; i++)); do
        case "${words[i]}" in
            -c|--config|-s|--socket) ((i++)) ;;
            -*) ;;
            *) cmd="${words[i]}"; break ;;
        esac
    done

    case "$prev" in
        -c|--config)
            COMPREPLY=($(compgen -f -- "$cur")); return ;;
        -s|--socket)
            COMPREPLY=($(compgen -f -- "$cur")); return ;;
        --level)
            COMPREPLY=($(compgen -W "1 2 3" -- "$cur")); return ;;
        --levels)
            COMPREPLY=($(compgen -W "1 2 3 1,2 1,2,3" -- "$cur")); return ;;
        --timeout|-n|--lines)
            return ;;
    esac

    if [[ -z "$cmd" ]]; then
        if [[ "$cur" == -* ]]; then
            COMPREPLY=($(compgen -W "$global_opts" -- "$cur"))
        else
            COMPREPLY=($(compgen -W "$commands" -- "$cur"))
        fi
        return
    fi

    local opts="--json -h --help"
    case "$cmd" in
        start|wake|kill|switch) opts+=" --no-wait --timeout" ;;
        sleep) opts+=" --level --no-wait --timeout" ;;
        logs) opts+=" -f --follow -n --lines" ;;
        validate) opts+=" --levels --verbose -v --timeout" ;;
        reload) opts+=" --timeout" ;;
        fleet) opts="-h --help --bind --api-key --check-inter -o --output" ;;
    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
        return
    fi

    # Model arguments: any number for status, one for the model commands.
    local nargs=0
    for ((i = i + 1; i < cword; i++)); do
        case "${words[i]}" in
            --level|--levels|--timeout|-n|--lines) ((i++)) ;;
            -*) ;;
            *) ((nargs++)) ;;
        esac
    done
    case "$cmd" in
        status)
            COMPREPLY=($(compgen -W "$(_llmuxctl_models)" -- "$cur")) ;;
        start|sleep|wake|kill|switch|logs|validate)
            if ((nargs == 0)); then
                COMPREPLY=($(compgen -W "$(_llmuxctl_models)" -- "$cur"))
            fi ;;
        fleet)
            if ((nargs == 0)); then
                COMPREPLY=($(compgen -W "haproxy" -- "$cur"))
            fi ;;
    esac
} &&
    complete -F _llmuxctl llmuxctl
